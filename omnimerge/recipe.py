"""Merge recipes: YAML (mergekit-style keys), validated with pydantic.

Example::

    base_model: Qwen/Qwen2-VL-7B          # a folder, or a hub id in the local Hugging Face cache
    models:
      - model: experts/vqa
        parameters: {weight: 1.0}          # optional per-model parameters
      - model: experts/chart-lora          # a PEFT adapter folder works too
        statistics: stats/chart.safetensors  # data-aware methods (regmean, fisher): `omnimerge stats`
    merge_method: ties
    parameters: {scaling: 0.3, density: 0.2}
    select:                                # default: the language model's linear weights
      include: [language_model]            # component names or regular expressions
      exclude: []
    dtype: float32                         # compute dtype
    out_dtype: bfloat16                    # default: each tensor keeps the base's dtype

Relative paths are relative to the recipe file's folder. Every key is checked: an unknown key or a bad value
raises :class:`~omnimerge.errors.RecipeError` naming it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from omnimerge import mergekit_format
from omnimerge.checkpoint.vocabulary import ChatTemplate, TokenizerSettings
from omnimerge.errors import RecipeError, quoted

MAX_RECIPE_BYTES = 10_000_000
#: a recipe's YAML may not expand (aliases counted each time they are used) to more nodes than this
MAX_YAML_NODES = 100_000

DType = Literal["float32", "float64", "bfloat16", "float16"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="path or cached hub id of a fine-tuned checkpoint or PEFT adapter")
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-model method parameters")
    name: str | None = Field(default=None, description="a display name (default: the folder name)")
    statistics: str | None = Field(
        default=None, description="the expert's statistics file for data-aware methods (regmean, fisher): "
        "safetensors written by `omnimerge stats` (see omnimerge.checkpoint.statistics)")

    @field_validator("model")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class Select(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include: list[str] = Field(default_factory=lambda: ["language_model"])
    exclude: list[str] = Field(default_factory=list)


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    #: the source's layers [first, stop) (mergekit's layer_range, stop excluded)
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-source method parameters")


class SliceEntry(BaseModel):
    """A run of output layers: its sources' layers merged (or, with passthrough, copied); see omnimerge.slices."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    #: the source that is the base of this slice's merge (default: the recipe's base_model, if a source)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A validated merge recipe."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    models: list[ModelEntry] = Field(default_factory=list)
    #: mergekit's slices (frankenmerges): the output's layers, run by run, from the sources' layer ranges; the
    #: output's other tensors and files come from base_model (see omnimerge.slices); models is then empty
    slices: list[SliceEntry] | None = None
    merge_method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: transforms composed with the method, in order: ``[{dare: {drop_rate: 0.5}}, {lines: {alpha: 0.3}}]``
    #: (see :mod:`omnimerge.methods.modifiers`)
    modifiers: list[Any] = Field(default_factory=list)
    select: Select = Field(default_factory=Select)
    dtype: DType = "float32"
    out_dtype: DType | None = None
    #: a model whose config/tokenizer/processor/chat-template files are copied over the base's (e.g. an
    #: instruct expert's chat template: the Qwen2-VL base has none)
    copy_files_from: str | None = None
    #: the output vocabulary, as mergekit's ``tokenizer:`` (source base, union or a model; per-token sources;
    #: pad_to_multiple_of): every input's embedding and LM-head rows are re-indexed into it before the merge
    #: (see omnimerge.checkpoint.vocabulary)
    tokenizer: TokenizerSettings | None = None
    #: the output's chat template: auto (the inputs' most common), a format name (chatml, llama3, alpaca,
    #: mistral, exaone) or a Jinja template
    chat_template: ChatTemplate | None = None
    shard_size: int | str = "5GB"
    output: Literal["full", "lora"] = "full"
    #: "capability": experts share the base's architecture (one merged model). "modality": experts of different
    #: architectures share the base's language model; the LLM is merged and one checkpoint per expert
    #: architecture is written, each with its own encoder/projector (see omnimerge.modality).
    mode: Literal["capability", "modality"] = "capability"
    rank: int | None = Field(default=None, ge=1)
    #: also write the per-task masks and rescalers that rebuild each expert's task-specific model from the
    #: unified merge (methods with per-task masks: emr, consensus; see omnimerge.task_models)
    task_models: bool = False
    #: folder that relative paths are resolved against (the recipe file's folder); not part of the YAML
    base_dir: str | None = Field(default=None, exclude=True)
    #: where the recipe was translated from another format (mergekit): one line per way omnimerge computes
    #: differently; printed by the run and recorded in the model card; not part of the YAML
    differences: list[str] = Field(default_factory=list, exclude=True)

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if self.slices is None and not self.models:
            raise ValueError("models: required key is missing (a list of models, or slices)")
        if self.slices is not None and self.models:
            raise ValueError("models: give models or slices, not both")
        if self.slices is not None and not self.slices:
            raise ValueError("slices: at least one slice is required")
        return self

    def to_yaml(self) -> str:
        data = self.model_dump(exclude={"base_dir"}, exclude_none=True)
        if self.slices is not None:
            data.pop("models", None)
        for key in ("modifiers", "task_models"):  # written only when used
            if not data.get(key):
                data.pop(key, None)
        return yaml.safe_dump(data, sort_keys=False)

    @property
    def base_path(self) -> Path | None:
        return Path(self.base_dir) if self.base_dir else None


def _loc(err: dict[str, Any]) -> str:
    parts: list[str] = []
    for p in err.get("loc", ()):
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        else:
            parts.append(str(p))
    return ".".join(parts) or "recipe"


def _not_utf8(value: Any, where: str) -> str | None:
    """The key path of the first string in ``value`` that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list | tuple):
        items = list(enumerate(value))
    for k, v in items:
        sub = f"{where}[{k}]" if isinstance(k, int) else (f"{where}.{k}" if where else str(k))
        if isinstance(k, str) and _not_utf8(k, where) is not None:
            return where or "recipe"
        found = _not_utf8(v, sub)
        if found is not None:
            return found
    return None


def validate_recipe(data: Any, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; errors name the key (e.g. ``models[1].parameters``) and the problem."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys (base_model, models, merge_method, ...)")
    bad = _not_utf8(data, "")
    if bad is not None:
        raise RecipeError(f"{source}: {bad or 'recipe'}: not a valid UTF-8 string (a lone surrogate such as "
                          f"\\udcff); paths and names are written into the model card as UTF-8")
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = _loc(err)
            if err["type"] == "extra_forbidden":
                msgs.append(f"{loc}: unknown key")
            elif err["type"] == "value_error" and not err.get("loc"):  # the recipe's own checks, by key
                msgs.append(str(err["msg"]).removeprefix("Value error, "))
            elif err["type"] == "missing":
                msgs.append(f"{loc}: required key is missing")
            else:
                msgs.append(f"{loc}: {err['msg']} (got {quoted(err.get('input'))})")
        raise RecipeError(f"{source}: " + "; ".join(msgs)) from None
    if base_dir is not None:
        r.base_dir = str(base_dir)
    return r


def _expanded_size(node: yaml.Node, memo: dict[int, int], where: str) -> int:
    """Nodes ``node`` expands to, an alias counted each time it is used (memoised: linear in the document)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise RecipeError(f"{where}: a YAML anchor refers to itself (a recursive structure)")
        return memo[key]
    memo[key] = -1
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded_size(c, memo, where) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded_size(k, memo, where) + _expanded_size(v, memo, where) for k, v in node.value)
    if n > MAX_YAML_NODES:
        raise RecipeError(f"{where}: the YAML expands to more than {MAX_YAML_NODES} values (an alias bomb?); "
                          f"refused")
    memo[key] = n
    return n


def load_yaml(text: str, where: str = "recipe") -> Any:
    """``yaml.safe_load`` that refuses, before building anything, a document whose aliases expand to more than
    :data:`MAX_YAML_NODES` values (a "billion laughs" bomb) or that nests too deeply."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({' '.join(str(e).split())[:300]})") from None
    except RecursionError:
        raise RecipeError(f"{where}: the YAML nests too deeply") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
        raise RecipeError(f"{where}: a value cannot be read ({' '.join(str(e).split())[:200]})") from None
    finally:
        loader.dispose()


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                fmt: Literal["auto", "omnimerge", "mergekit"] = "auto") -> Recipe:
    """Read a YAML recipe, apply ``--set key.path=value`` overrides, validate.

    ``fmt="auto"`` detects a mergekit recipe (see :mod:`omnimerge.mergekit_format`) and translates it; the
    overrides then apply to the translated (omnimerge) recipe."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e.strerror or e})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{p}: larger than {MAX_RECIPE_BYTES // 1_000_000} MB; not a recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not UTF-8 text") from None
    data = load_yaml(text, str(p))
    differences: list[str] = []
    if fmt == "mergekit" or (fmt == "auto" and mergekit_format.is_mergekit_recipe(data)):
        data, differences = mergekit_format.translate(data, str(p))
    data = apply_overrides(data, overrides or [], str(p))
    r = validate_recipe(data, str(p), p.resolve().parent)
    r.differences = [f"mergekit recipe: {d}" for d in differences]
    return r


def apply_overrides(data: Any, overrides: list[str], source: str = "recipe") -> Any:
    """Apply ``a.b.c=value`` overrides (the value is parsed as YAML; list items by index: ``models.0.model``)."""
    data = copy.deepcopy(data) if data is not None else {}
    for ov in overrides:
        key, sep, raw = ov.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {ov!r}: expected KEY=VALUE, e.g. parameters.scaling=0.5")
        try:
            value = load_yaml(raw, f"--set {quoted(ov)}") if raw != "" else ""
        except RecipeError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                try:
                    idx = int(part)
                    if last:
                        node[idx] = value
                    else:
                        node = node[idx]
                except (ValueError, IndexError):
                    raise RecipeError(f"--set {ov!r}: '{part}' is not an index of {'.'.join(parts[:i])}") from None
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"--set {ov!r}: '{'.'.join(parts[:i])}' is not a mapping")
    return data
