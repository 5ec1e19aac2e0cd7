"""Models to evaluate, as users have them: a checkpoint folder, a hub id in the local Hugging Face cache, a PEFT
adapter on its base, or a merge recipe merged in memory into its base (no merged checkpoint written).

:func:`load_model` returns a :class:`LoadedModel`: the transformers model (the class its config names, never
remote code), its processor (chat template included) and, for a recipe, the open :class:`omnimerge.Merger`, so
that :meth:`LoadedModel.remerge` merges again with other parameters into the same loaded model (a search)."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnimerge.errors import CheckpointError, OmniMergeError

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass
class LoadedModel:
    """A model ready to generate: ``model`` (eval mode, on ``device``), ``processor``, ``config`` and where it came
    from (``kind``: 'checkpoint', 'adapter' or 'recipe'; ``path``: its folder or recipe file)."""

    model: Any
    processor: Any
    config: Any
    kind: str
    path: Path | None
    device: str = "cpu"
    merger: Any = field(default=None, repr=False)
    last_report: Any = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config.model_type)

    def remerge(self, parameters: dict[str, Any] | None = None,
                model_parameters: list[dict[str, Any]] | None = None) -> Any:
        """Merge the recipe again, with these method parameters, into the loaded model (in place); returns the
        MergeReport. Only for a model loaded from a recipe."""
        if self.merger is None:
            raise OmniMergeError(f"{self.path}: remerge needs a model loaded from a merge recipe, not a {self.kind}")
        self.last_report = self.merger.into(self.model, parameters, model_parameters, only_merged=True)
        return self.last_report

    def close(self) -> None:
        """Close the recipe's open inputs (if any)."""
        if self.merger is not None:
            self.merger.close()
            self.merger = None

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_config(path: Path) -> Any:
    """The transformers config of the checkpoint folder ``path`` (one-line error when missing or unknown)."""
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read the config ({e})") from None
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError):
        hint = (" (InternVL's remote-code checkpoints are not run; use the transformers-native conversion, "
                "e.g. OpenGVLab/InternVL2_5-1B-MPO-hf, model_type 'internvl')") if model_type == "internvl_chat" else ""
        raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not an architecture transformers knows "
                              f"without remote code{hint}") from None


def model_class(config: Any) -> Any:
    """The transformers auto class that builds this config's model: image-text-to-text (VLMs), else causal LM."""
    import transformers as T

    for auto in (T.AutoModelForImageTextToText, T.AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto
    raise CheckpointError(f"model_type {config.model_type!r} ({type(config).__name__}): transformers has no "
                          "image-text-to-text or causal-LM class for it, so it cannot generate")


@functools.cache
def image_only(processor_cls: type) -> type:
    """``processor_cls`` accepting ``video_processor=None``: transformers' video processors need torchvision, which
    an image-only evaluation does not; the image processor, tokenizer and chat template are the real ones."""

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(processor_cls.__name__, (processor_cls,),
                {"check_argument_for_proper_class": check_argument_for_proper_class,
                 "__module__": processor_cls.__module__})


def _chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        f = path / name
        if f.is_file():
            tpl = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            if tpl:
                return str(tpl)
    return None


def load_processor(path: Path, config: Any, processor_kwargs: Mapping[str, Any] | None = None) -> Any:
    """The checkpoint's own processor (tokenizer, image processor, chat template), without remote code;
    ``processor_kwargs`` override its image processor's settings (e.g. Qwen2-VL's ``min_pixels``/``max_pixels``).

    Where transformers cannot build the processor's video processor (no torchvision installed), the same
    processor class is built from its image processor and tokenizer with no video processor."""
    import transformers as T
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    kw = dict(processor_kwargs or {})
    try:
        return T.AutoProcessor.from_pretrained(path, trust_remote_code=False, **kw)
    except Exception as first:  # noqa: BLE001 - the fallback below says what failed if it fails too
        cls = PROCESSOR_MAPPING.get(type(config), None)
        if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
            raise CheckpointError(f"{path}: cannot load the processor ({str(first).splitlines()[0]})") from None
        try:
            kwargs: dict[str, Any] = {}
            pc = path / "processor_config.json"
            if pc.is_file():
                params = inspect.signature(cls.__init__).parameters
                saved = json.loads(pc.read_text(encoding="utf-8"))
                kwargs = {k: v for k, v in saved.items() if k in params and k not in ("chat_template",)}
            return image_only(cls)(image_processor=T.AutoImageProcessor.from_pretrained(path, **kw),
                                   tokenizer=T.AutoTokenizer.from_pretrained(path), video_processor=None,
                                   chat_template=_chat_template(path), **kwargs)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot load the processor ({str(e).splitlines()[0]})") from None


def _from_pretrained(path: Path, config: Any, device: str, dtype: Any) -> Any:
    cls = model_class(config)
    try:
        model = cls.from_pretrained(path, config=config, dtype=dtype, trust_remote_code=False)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot load the weights ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


def _dtype(device: str, dtype: Any) -> Any:
    import torch

    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(source: str | Path | Mapping[str, Any], *, base: str | Path | None = None, device: str = "cpu",
               dtype: Any = None, merge_parameters: dict[str, Any] | None = None,
               processor_kwargs: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load ``source`` for generation on ``device`` (default dtype: float32 on CPU, bfloat16 on CUDA).

    ``source``: a checkpoint folder or hub id in the local cache; a PEFT adapter folder (its
    ``base_model_name_or_path``, or ``base``, is loaded and the adapter merged into it in memory); or a merge
    recipe (a YAML path or a dict with its keys): the base is loaded once and the recipe merged into it in
    memory (``merge_parameters`` override the recipe's method parameters); the returned model keeps the
    :class:`~omnimerge.Merger` open for :meth:`LoadedModel.remerge` (close it with :meth:`LoadedModel.close`).
    ``processor_kwargs`` go to the processor (e.g. ``{"max_pixels": 1280 * 28 * 28}`` for Qwen2-VL).
    """
    from omnimerge.checkpoint.reader import resolve_model_path

    _quiet()
    torch_dtype = _dtype(device, dtype)
    if isinstance(source, Mapping) or str(source).endswith(RECIPE_SUFFIXES):
        return _load_recipe(source, device, torch_dtype, merge_parameters, processor_kwargs)
    path = resolve_model_path(str(source))
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter(path, base, device, torch_dtype, processor_kwargs)
    config = load_config(path)
    model = _from_pretrained(path, config, device, torch_dtype)
    return LoadedModel(model, load_processor(path, config, processor_kwargs), model.config, "checkpoint", path,
                       device)


def _load_adapter(path: Path, base: str | Path | None, device: str, dtype: Any,
                  processor_kwargs: Mapping[str, Any] | None) -> LoadedModel:
    from omnimerge.checkpoint.reader import read_json, resolve_model_path

    try:
        from peft import PeftModel
    except ImportError:
        raise CheckpointError(f"{path}: a PEFT adapter; install peft to evaluate it") from None
    ref = str(base) if base is not None else read_json(path / "adapter_config.json").get("base_model_name_or_path")
    if not ref:
        raise CheckpointError(f"{path / 'adapter_config.json'}: no base_model_name_or_path; give the base model")
    base_path = resolve_model_path(str(ref))
    config = load_config(base_path)
    model = _from_pretrained(base_path, config, device, dtype)
    try:
        model = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the adapter does not fit its base {base_path} "
                              f"({str(e).splitlines()[0]})") from None
    proc_src = path if (path / "tokenizer_config.json").is_file() else base_path
    return LoadedModel(model.eval(), load_processor(proc_src, config, processor_kwargs), model.config, "adapter",
                       path, device)


def _load_recipe(source: str | Path | Mapping[str, Any], device: str, dtype: Any,
                 merge_parameters: dict[str, Any] | None, processor_kwargs: Mapping[str, Any] | None) -> LoadedModel:
    from omnimerge.api import Merger, as_recipe
    from omnimerge.checkpoint.reader import resolve_model_path

    recipe = as_recipe(dict(source) if isinstance(source, Mapping) else source)
    if recipe.output != "full":
        raise OmniMergeError(f"recipe: output '{recipe.output}' writes an adapter; evaluate recipes with "
                             "output: full")
    base_path = resolve_model_path(recipe.base_model, recipe.base_path)
    files = resolve_model_path(recipe.copy_files_from, recipe.base_path) if recipe.copy_files_from else base_path
    config = load_config(base_path)
    model = _from_pretrained(base_path, config, device, dtype)
    processor = load_processor(files, load_config(files) if files != base_path else config, processor_kwargs)
    merger = Merger(recipe, device=device if str(device).startswith("cuda") else None)
    loaded = LoadedModel(model, processor, model.config, "recipe",
                         None if isinstance(source, Mapping) else Path(source), device, merger)
    try:
        loaded.remerge(merge_parameters)
    except BaseException:
        loaded.close()
        raise
    return loaded
