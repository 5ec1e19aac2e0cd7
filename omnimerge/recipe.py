"""Merge recipes: YAML (mergekit-style keys), validated with pydantic.

Example::

    base_model: Qwen/Qwen2-VL-7B          # a folder, or a hub id in the local Hugging Face cache
    models:
      - model: experts/vqa
        parameters: {weight: 1.0}          # optional per-model parameters
      - model: experts/chart-lora          # a PEFT adapter folder works too
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omnimerge import mergekit_format
from omnimerge.errors import RecipeError

DType = Literal["float32", "float64", "bfloat16", "float16"]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="path or cached hub id of a fine-tuned checkpoint or PEFT adapter")
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-model method parameters")
    name: str | None = Field(default=None, description="a display name (default: the folder name)")

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


class Recipe(BaseModel):
    """A validated merge recipe."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    models: list[ModelEntry] = Field(min_length=1)
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

    def to_yaml(self) -> str:
        data = self.model_dump(exclude={"base_dir"}, exclude_none=True)
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


def validate_recipe(data: Any, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; errors name the key (e.g. ``models[1].parameters``) and the problem."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys (base_model, models, merge_method, ...)")
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = _loc(err)
            if err["type"] == "extra_forbidden":
                msgs.append(f"{loc}: unknown key")
            elif err["type"] == "missing":
                msgs.append(f"{loc}: required key is missing")
            else:
                msgs.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        raise RecipeError(f"{source}: " + "; ".join(msgs)) from None
    if base_dir is not None:
        r.base_dir = str(base_dir)
    return r


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                fmt: Literal["auto", "omnimerge", "mergekit"] = "auto") -> Recipe:
    """Read a YAML recipe, apply ``--set key.path=value`` overrides, validate.

    ``fmt="auto"`` detects a mergekit recipe (see :mod:`omnimerge.mergekit_format`) and translates it; the
    overrides then apply to the translated (omnimerge) recipe."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML ({e})") from None
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
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
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
