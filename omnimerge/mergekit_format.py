"""Translate mergekit (0.1.5) YAML recipes into omnimerge recipes.

Pure: :func:`translate` takes the parsed mapping and returns an omnimerge recipe mapping plus a list of stated
differences (one line each; the CLI prints them and the model card records them). A recipe omnimerge cannot
reproduce raises :class:`~omnimerge.errors.RecipeError` with one line naming the key.

What maps:

* ``models[].parameters`` / top-level ``parameters``: mergekit lets any parameter be set per model or at the top
  (the top-level value is the default for every model). omnimerge's per-model parameter is ``weight``; every
  other parameter must be the same for all models and becomes a top-level one.
* gradients (a list of numbers) are omnimerge schedules (same interpolation: t = layer / (num_layers - 1)).
* filtered lists ``[{filter: ..., value: ...}, ...]``: only a catch-all (no filter or ``*``) is reproduced.
* ``lambda`` is omnimerge's ``scaling`` (mergekit's default 1.0 is written out: omnimerge's defaults differ).
* ``dare_*``: mergekit's ``density`` (keep fraction) is omnimerge's ``drop_rate = 1 - density``.
* mergekit merges every tensor: the translated recipe selects ``.*``.
* ``tokenizer_source`` / ``tokenizer:`` (``source: base | union | MODEL``, ``tokens:``, ``pad_to_multiple_of``)
  is the recipe's ``tokenizer:`` with mergekit's meaning: the output vocabulary is built and every input's
  embedding and LM-head rows are re-indexed into it (:mod:`omnimerge.checkpoint.vocabulary`).
* ``chat_template`` (``auto``, a format name, a Jinja template) is the recipe's ``chat_template``.
"""

from __future__ import annotations

from typing import Any

from omnimerge.checkpoint.vocabulary import CHAT_TEMPLATES
from omnimerge.errors import RecipeError

CHAT_TEMPLATE_NAMES = frozenset(CHAT_TEMPLATES)
#: named formats whose mergekit 0.1.5 file renders differently from omnimerge's text (chatml and mistral render
#: the same), and how
TEMPLATES_RENDERED_OTHERWISE = {
    "llama3": "a newline after every turn's <|eot_id|>",
    "alpaca": "a leading blank line without a system message, no blank line before the generation prompt",
    "exaone": "indentation and blank lines from its template's layout",
}

#: keys only a mergekit recipe has
_MERGEKIT_ONLY = {"tokenizer_source", "slices", "modules", "base_model_name"}
#: keys both formats have that mark a mergekit recipe unless an omnimerge-only key is there too
_SHARED_MARKS = {"tokenizer", "chat_template"}
_OMNIMERGE_ONLY = {"select", "modifiers", "mode", "output", "copy_files_from", "shard_size", "rank", "task_models"}

#: mergekit method -> omnimerge method
METHODS: dict[str, str] = {
    "linear": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties",
    "dare_linear": "dare_ta", "breadcrumbs": "breadcrumbs", "breadcrumbs_ties": "breadcrumbs_ties",
    "della": "della", "della_linear": "della_linear", "sce": "sce", "slerp": "slerp", "nuslerp": "nuslerp",
    "multislerp": "multislerp", "karcher": "karcher", "model_stock": "model_stock", "nearswap": "nearswap",
    "ram": "ram", "arcee_fusion": "arcee_fusion",
}
#: methods with a final multiplier (mergekit's ``lambda``, default 1.0)
_SCALED = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear"}
_DARE = {"dare_ties", "dare_linear"}
#: mergekit's ``normalize`` default per method, where it has one
_NORMALIZE_DEFAULT = {"linear": True, "ties": True, "dare_ties": True, "breadcrumbs_ties": True, "della": True,
                      "task_arithmetic": False, "dare_linear": False, "breadcrumbs": False,
                      "della_linear": False}


def is_mergekit_recipe(data: Any) -> bool:
    """True for a mapping that only mergekit's format has: its keys, ``lambda``, or filtered parameter lists."""
    if not isinstance(data, dict):
        return False
    if _MERGEKIT_ONLY & set(data):
        return True
    if _SHARED_MARKS & set(data) and not _OMNIMERGE_ONLY & set(data):
        return True
    params = data.get("parameters") or {}
    if isinstance(params, dict) and ({"lambda", "int8_mask"} & set(params)):
        return True
    return "base_model" not in data and bool(data.get("models"))  # mergekit allows no base (e.g. linear)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """A parameters block: absent/empty -> {}; anything but a mapping is refused by name."""
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping of parameter names to values, got {value!r}")
    return value


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _resolve(key: str, where: str, value: Any) -> Any:
    """A mergekit parameter setting as an omnimerge value: scalar, list (schedule) or catch-all filter."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for cond in value:
            if set(cond) - {"filter", "value"} or "value" not in cond:
                raise RecipeError(f"{where}.{key}: a filtered entry has keys filter and value, "
                                  f"got {sorted(map(str, cond))}")
            if cond.get("filter") in (None, "*"):
                if cond is value[0]:
                    return _resolve(key, where, cond["value"])
                break
        filters = [c.get("filter") for c in value]
        raise RecipeError(f"{where}.{key}: per-tensor filters {filters} have no omnimerge equivalent yet "
                          f"(only a catch-all value is translated)")
    return value


def translate(data: Any, source: str = "recipe") -> tuple[dict[str, Any], list[str]]:
    """A mergekit recipe mapping -> (omnimerge recipe mapping, stated differences)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a mergekit recipe must be a mapping of keys")
    diffs: list[str] = []
    for key in ("slices", "modules"):
        if key in data:
            raise RecipeError(f"{source}: {key}: mergekit's {key} (layer-range merges) are not translated yet")
    method = data.get("merge_method")
    if not isinstance(method, str) or method not in METHODS:
        raise RecipeError(f"{source}: merge_method: expected one of mergekit's methods "
                          f"({', '.join(sorted(METHODS))}), got {method!r}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{source}: models: a list of models is required")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise RecipeError(f"{source}: base_model: expected a model path or hub id, got {base!r}")
    if not base:
        raise RecipeError(f"{source}: base_model: omnimerge needs a base model (mergekit's {method} without "
                          f"one has no equivalent)")
    top = dict(_mapping(data.get("parameters"), f"{source}: parameters"))
    shared: dict[str, Any] = {}
    for key in ("normalize", "int8_mask"):
        if key in top:
            shared[key] = top.pop(key)
    lam = top.pop("lambda", 1.0)
    out_models: list[dict[str, Any]] = []
    per_key: dict[str, list[Any]] = {}
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise RecipeError(f"{source}: models[{i}]: expected a mapping with a 'model' key")
        where = f"{source}: models[{i}].parameters"
        params = {**top, **_mapping(m.get("parameters"), f"{where}")}
        entry: dict[str, Any] = {"model": str(m["model"])}
        if m["model"] == base:
            if method == "linear" and params.get("weight"):
                raise RecipeError(f"{source}: models[{i}]: mergekit's linear averages the base model in with "
                                  f"its weight; omnimerge's linear averages the experts only")
            continue  # mergekit lists the base among models; omnimerge has it as base_model only
        mparams: dict[str, Any] = {}
        for k, v in params.items():
            v = _resolve(k, where, v)
            if k == "weight":
                mparams["weight"] = v
            else:
                per_key.setdefault(k, []).append(v)
        if mparams:
            entry["parameters"] = mparams
        out_models.append(entry)
    if not out_models:
        raise RecipeError(f"{source}: models: every model is the base model; nothing to merge")
    params_out: dict[str, Any] = {}
    for k, vals in per_key.items():
        if len(vals) != len(out_models) or any(v != vals[0] for v in vals):
            raise RecipeError(f"{source}: models[].parameters.{k}: per-model values {vals} differ; omnimerge "
                              f"takes one {k} for all models (only weight is per model)")
        params_out[k] = vals[0]
    if method in _DARE and "density" in params_out:
        d = params_out.pop("density")
        if not (_number(d) or (isinstance(d, list) and d and all(_number(x) for x in d))):
            raise RecipeError(f"{source}: parameters.density: expected a number in [0, 1] or a list of them, "
                              f"got {d!r}")
        params_out["drop_rate"] = [1 - x for x in d] if isinstance(d, list) else 1 - d
        if method == "dare_ties":
            params_out["density"] = 1.0  # mergekit's dare_ties trims at random only
    if method in _SCALED:
        params_out["scaling"] = lam
    elif lam != 1.0:
        raise RecipeError(f"{source}: parameters.lambda: {method} has no final multiplier in omnimerge")
    normalize = shared.get("normalize", _NORMALIZE_DEFAULT.get(method))
    if normalize is not None:
        if method in ("linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
            params_out["normalize"] = bool(normalize)
        elif method in ("ties", "dare_ties") and not normalize:
            diffs.append(f"parameters.normalize: false: omnimerge's {method} always divides by the sum of the "
                         f"agreeing weights (mergekit's normalize: true)")
        elif method in ("ties", "dare_ties"):
            diffs.append(f"{method}: entries whose elected sign is 0 and the trimming threshold's ties are "
                         f"handled as in the TIES paper, not as in mergekit (small differences in a few entries)")
        elif normalize:
            diffs.append(f"parameters.normalize: true: omnimerge's {METHODS[method]} does not normalize "
                         f"(set weights that sum to 1 to match)")
    if shared.get("int8_mask"):
        diffs.append("parameters.int8_mask: mergekit stores masks as int8 to save memory; omnimerge's masks "
                     "are its own (no effect on the result)")
    recipe: dict[str, Any] = {"base_model": str(base), "models": out_models, "merge_method": METHODS[method],
                              "parameters": params_out, "select": {"include": [".*"]}}
    for key in ("dtype", "out_dtype"):
        if key in data:
            recipe[key] = data[key]
    tokenizer = _tokenizer(data, source, [str(m["model"]) if isinstance(m, dict) else str(m) for m in models],
                           str(base), diffs)
    if tokenizer is not None:
        recipe["tokenizer"] = tokenizer
    template = data.get("chat_template")
    if template is not None:
        if not isinstance(template, str) or not template:
            raise RecipeError(f"{source}: chat_template: expected auto, a template name or a Jinja template, got "
                              f"{template!r}")
        recipe["chat_template"] = template
        if template in TEMPLATES_RENDERED_OTHERWISE:
            diffs.append(f"chat_template: {template}: omnimerge's own text of the {template} format; mergekit's "
                         f"file renders other whitespace ({TEMPLATES_RENDERED_OTHERWISE[template]})")
    unknown = set(data) - {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
                           "tokenizer_source", "tokenizer", "chat_template"}
    if unknown:
        raise RecipeError(f"{source}: {sorted(unknown)[0]}: unknown mergekit key")
    return recipe, diffs


def _tokenizer(data: dict[str, Any], source: str, models: list[str], base: str,
               diffs: list[str]) -> dict[str, Any] | None:
    """mergekit's ``tokenizer_source`` / ``tokenizer:`` as the omnimerge recipe's ``tokenizer:`` (None: unset)."""
    legacy, block = data.get("tokenizer_source"), data.get("tokenizer")
    if legacy is not None and block is not None:
        raise RecipeError(f"{source}: tokenizer_source: give tokenizer_source or tokenizer, not both (mergekit "
                          f"refuses both)")
    if block is not None and not isinstance(block, dict):
        raise RecipeError(f"{source}: tokenizer: expected a mapping (source, tokens, pad_to_multiple_of), got "
                          f"{block!r}")
    if legacy is None and block is None:
        return None
    out = {"source": legacy} if legacy is not None else {"source": "union", **block}
    src = out["source"]
    key = "tokenizer_source" if legacy is not None else "tokenizer.source"
    if not isinstance(src, str) or not src:
        raise RecipeError(f"{source}: {key}: expected base, union or a model, got {src!r}")
    others = {m for m in models if m != base}
    if src == "union" and others:
        diffs.append("tokenizer: union: tokens new to the base are numbered in the recipe's order of models, "
                     "each model's by id (mergekit's order follows a set of the models and the tokenizer's "
                     "unordered vocabulary map; each token keeps the same rows)")
    return out


# --- omnimerge -> mergekit -------------------------------------------------------------------------------------

#: omnimerge method -> mergekit method
TO_MERGEKIT: dict[str, str] = {om: mk for mk, om in METHODS.items()}
_EVERYTHING = {".*", "^.*$", ".+", ""}


def to_mergekit(recipe: Any) -> tuple[dict[str, Any], list[str]]:
    """An omnimerge :class:`~omnimerge.recipe.Recipe` -> (mergekit recipe mapping, stated differences).

    Every parameter is written out at its effective value (omnimerge's defaults are not mergekit's: TIES's
    scaling 0.3 and density 0.2 against mergekit's lambda 1 and density 1). What mergekit cannot express raises
    :class:`RecipeError` naming the key: methods mergekit lacks, modifiers, LoRA or modality output, per-task
    models, DARE-TIES with a magnitude trim besides the random drop, a non-tensor granularity."""
    from omnimerge.methods import registry

    src = "recipe"
    method = recipe.merge_method
    if method not in TO_MERGEKIT:
        raise RecipeError(f"{src}: merge_method: '{method}' has no mergekit equivalent (mergekit has: "
                          f"{', '.join(sorted(TO_MERGEKIT))})")
    for key, bad, why in (("modifiers", bool(recipe.modifiers), "composed modifiers"),
                          ("output", recipe.output != "full", "LoRA output"),
                          ("mode", recipe.mode != "capability", "modality merging"),
                          ("task_models", bool(recipe.task_models), "per-task models")):
        if bad:
            raise RecipeError(f"{src}: {key}: mergekit has no {why}")
    mk = TO_MERGEKIT[method]
    spec = registry()[method]
    defaults = {p.name: p.default for p in spec.params}
    top = {k: v for k, v in {**defaults, **recipe.parameters}.items() if k != "weight"}
    diffs: list[str] = []
    params: dict[str, Any] = {}
    for k, v in top.items():
        if v is None:
            raise RecipeError(f"{src}: parameters.{k}: required by {method} and not set")
        if k == "scaling":
            params["lambda"] = v
        elif k == "drop_rate":
            params["density"] = [1 - x for x in v] if isinstance(v, list) else 1 - v
        elif k == "density" and method == "dare_ties":
            if v != 1.0:
                raise RecipeError(f"{src}: parameters.density: {v}: omnimerge's dare_ties trims by magnitude "
                                  f"before the random drop; mergekit's dare_ties only drops (set density: 1.0)")
        elif k == "granularity":
            if v != "tensor":
                raise RecipeError(f"{src}: parameters.granularity: '{v}' has no mergekit equivalent "
                                  f"(mergekit trims per tensor)")
        elif k == "seed":
            diffs.append(f"parameters.seed: {v}: mergekit draws its random masks from torch's generator "
                         f"(--random-seed), not omnimerge's counter-based masks: a different random draw")
        else:
            params[k] = v
    if method in ("ties", "dare_ties"):
        params.setdefault("normalize", True)
        diffs.append(f"{mk}: entries whose elected sign is 0 and the trimming threshold's ties are handled as "
                     f"in mergekit, not as in the TIES paper (small differences in a few entries)")
    if method in ("dare_ties", "dare_ta"):
        diffs.append(f"{mk}: mergekit rescales the kept entries to keep each tensor's L1 norm, omnimerge by "
                     f"1/(1 - drop_rate) as the DARE paper")
    models = []
    for m in recipe.models:
        entry: dict[str, Any] = {"model": m.model}
        extra = set(m.parameters) - {"weight"}
        if extra:
            raise RecipeError(f"{src}: models[].parameters.{sorted(extra)[0]}: only weight is per model here")
        if "weight" in m.parameters or "weight" in defaults:
            entry["parameters"] = {"weight": m.parameters.get("weight", defaults.get("weight", 1.0))}
        models.append(entry)
    out: dict[str, Any] = {"merge_method": mk, "base_model": recipe.base_model, "models": models}
    if params:
        out["parameters"] = params
    out["dtype"] = recipe.dtype
    if recipe.out_dtype:
        out["out_dtype"] = recipe.out_dtype
    tok = recipe.tokenizer
    if tok is not None and (tok.tokens or tok.pad_to_multiple_of):
        block = tok.model_dump(exclude_none=True, exclude_defaults=True)
        block["source"] = tok.source
        out["tokenizer"] = block
    else:
        # without one, mergekit's base: written, a key only mergekit recipes have, so the file reads as mergekit's
        out["tokenizer_source"] = tok.source if tok is not None else "base"
    if recipe.copy_files_from:
        if tok is None:
            out["tokenizer_source"] = recipe.copy_files_from
        diffs.append(f"copy_files_from: {recipe.copy_files_from}: mergekit's tokenizer_source takes its "
                     f"tokenizer and re-maps embeddings when the vocabularies differ; omnimerge copied files")
    if recipe.chat_template is not None:
        out["chat_template"] = recipe.chat_template
    sel = recipe.select
    if not (set(sel.include) & _EVERYTHING) or sel.exclude:
        diffs.append(f"select: {{include: {sel.include}, exclude: {sel.exclude}}}: mergekit merges every tensor; "
                     f"omnimerge left the others at the base (the vision tower and projector by default)")
    if str(recipe.shard_size) != "5GB":
        diffs.append(f"shard_size: {recipe.shard_size}: a mergekit-yaml option, --out-shard-size")
    return out, diffs
