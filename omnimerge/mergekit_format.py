"""Translate mergekit (0.1.5) YAML recipes into omnimerge recipes.

Pure: :func:`translate` takes the parsed mapping and returns an omnimerge recipe mapping plus a list of stated
differences (one line each; the CLI prints them and the model card records them). A recipe omnimerge cannot
reproduce raises :class:`~omnimerge.errors.RecipeError` with one line naming the key.

What maps:

* ``models[].parameters`` / top-level ``parameters``: mergekit lets any parameter be set per model or at the top
  (the top-level value is the default for every model). omnimerge's per-model parameter is ``weight``; every
  other parameter must be the same for all models and becomes a top-level one.
* gradients (a list of numbers) are omnimerge schedules (same interpolation: t = layer / (num_layers - 1)).
* filtered lists ``[{filter: ..., value: ...}, ...]`` are omnimerge's ``{filters: [...], other: v}`` (first
  substring match on the tensor's name wins; the scopes a mergekit recipe sets a parameter in -- the model's,
  then the top level -- are concatenated, since mergekit falls through to the next scope when no filter
  matches, and the first catch-all ends the list as ``other``).
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


def _entries(key: str, where: str, value: Any) -> list[tuple[str | None, Any]]:
    """One scope's setting of a parameter as mergekit reads it: an ordered list of (filter, value), a scalar or
    gradient being one catch-all entry (filter None); an empty list is no entry (mergekit falls through)."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        out: list[tuple[str | None, Any]] = []
        for cond in value:
            if not isinstance(cond, dict) or set(cond) - {"filter", "value"} or "value" not in cond:
                got = sorted(map(str, cond)) if isinstance(cond, dict) else cond
                raise RecipeError(f"{where}.{key}: a filtered entry has keys filter and value, got {got!r}")
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise RecipeError(f"{where}.{key}: a filter is a part of a tensor name, got {flt!r}")
            if isinstance(cond["value"], dict) or (isinstance(cond["value"], list)
                                                   and any(isinstance(x, dict) for x in cond["value"])):
                raise RecipeError(f"{where}.{key}: a filter's value is a number or a gradient (a list), got "
                                  f"{cond['value']!r}")
            out.append((None if flt in (None, "*") else flt, cond["value"]))
        return out
    if isinstance(value, list) and not value:
        return []
    return [(None, value)]


def _scoped_entries(key: str, where: str, scopes: tuple[Any, ...]) -> list[tuple[str | None, Any]]:
    """The (filter, value) entries of one parameter over mergekit's scopes (highest precedence first),
    concatenated up to the first scope that has a catch-all (mergekit never looks past it)."""
    entries: list[tuple[str | None, Any]] = []
    for scope in scopes:
        entries += _entries(key, where, scope)
        if any(f is None for f, _ in entries):
            break
    return entries


def _combine(key: str, where: str, *scopes: Any) -> Any:
    """The settings of one parameter over mergekit's scopes (highest precedence first) as one omnimerge value:
    mergekit takes the first scope that yields a value and, inside it, the first entry whose filter matches, so
    the scopes' entries concatenated (up to the first catch-all) resolve every tensor alike. Returns None (not
    set), a scalar or gradient (a catch-all first), or omnimerge's ``{filters: [...], other: v}``."""
    entries = _scoped_entries(key, where, scopes)
    if not entries:
        return None
    if entries[0][0] is None:
        return entries[0][1]
    out: dict[str, Any] = {"filters": []}
    for f, v in entries:
        if f is None:
            out["other"] = v
            break
        out["filters"].append({"filter": f, "value": v})
    return out


def _map_values(value: Any, fn: Any) -> Any:
    """``fn`` applied to every number of a setting: a scalar, a gradient or omnimerge filters."""
    if isinstance(value, dict) and "filters" in value:
        out = {"filters": [{**e, "value": _map_values(e["value"], fn)} for e in value["filters"]]}
        if "other" in value:
            out["other"] = _map_values(value["other"], fn)
        return out
    if isinstance(value, list):
        return [_map_values(x, fn) for x in value]
    if not _number(value):
        raise RecipeError(f"expected a number, a gradient or filters, got {value!r}")
    return fn(value)


def _as_mergekit(value: Any, default: Any) -> Any:
    """An omnimerge parameter value as mergekit writes it: filters become a filtered list ending with the
    catch-all (``other``, or the parameter's default, omnimerge's defaults not being mergekit's)."""
    if isinstance(value, dict) and "filters" in value:
        out: list[dict[str, Any]] = []
        if any("component" in e for e in value["filters"]):
            raise RecipeError(f"filters by component {value['filters']!r} have no per-tensor mergekit form "
                              f"(mergekit sets them per module, in a modules recipe)")
        for e in value["filters"]:
            out.append({"filter": "*" if e.get("filter") is None else e["filter"], "value": e["value"]})
        other = value.get("other", default)
        if other is not None:
            out.append({"value": other})
        return out
    if isinstance(value, dict):
        raise RecipeError(f"a value {value!r} (layer groups) has no mergekit equivalent; write per-tensor filters "
                          f"or a gradient")
    return value


def _dtypes(data: dict[str, Any], recipe: dict[str, Any], diffs: list[str]) -> None:
    """mergekit's ``dtype`` casts the inputs and, without ``out_dtype``, is the output's dtype: omnimerge computes
    in float32 (float64 for float64) from the stored values and writes ``out_dtype or dtype``."""
    dt, odt = data.get("dtype"), data.get("out_dtype")
    if dt is not None:
        recipe["dtype"] = "float64" if dt == "float64" else "float32"
        if dt in ("float16", "bfloat16"):
            diffs.append(f"dtype: {dt}: mergekit rounds the inputs to {dt} before merging; omnimerge merges in "
                         f"float32 and rounds the result to {odt or dt} once")
    if odt is not None or dt is not None:
        recipe["out_dtype"] = odt or dt


def translate(data: Any, source: str = "recipe") -> tuple[dict[str, Any], list[str]]:
    """A mergekit recipe mapping -> (omnimerge recipe mapping, stated differences)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a mergekit recipe must be a mapping of keys")
    diffs: list[str] = []
    if "modules" in data:
        return _translate_modules(data, source)
    if "slices" in data:
        return _translate_slices(data, source)
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
    base_free = False
    if not base and method == "linear" and models:  # a weighted average needs no base: every model is an input
        first = models[0]
        base = str(first.get("model") if isinstance(first, dict) else first)
        base_free = True
    if not base:
        raise RecipeError(f"{source}: base_model: omnimerge needs a base model (mergekit's {method} without "
                          f"one has no equivalent)")
    top = dict(_mapping(data.get("parameters"), f"{source}: parameters"))
    shared: dict[str, Any] = {}
    for key in ("normalize", "int8_mask"):
        if key in top:
            shared[key] = top.pop(key)
    lam = _combine("lambda", f"{source}: parameters", top.pop("lambda", None))
    lam = 1.0 if lam is None else lam
    out_models: list[dict[str, Any]] = []
    per_key: dict[str, list[Any]] = {}
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise RecipeError(f"{source}: models[{i}]: expected a mapping with a 'model' key")
        where = f"{source}: models[{i}].parameters"
        own = _mapping(m.get("parameters"), f"{where}")
        params = {k: v for k in dict.fromkeys([*own, *top])
                  if (v := _combine(k, where, own.get(k), top.get(k))) is not None}
        entry: dict[str, Any] = {"model": str(m["model"])}
        if m["model"] == base and not base_free:
            if method == "linear" and params.get("weight"):
                raise RecipeError(f"{source}: models[{i}]: mergekit's linear averages the base model in with "
                                  f"its weight; omnimerge's linear averages the experts only")
            continue  # mergekit lists the base among models; omnimerge has it as base_model only
        mparams: dict[str, Any] = {}
        for k, v in params.items():
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
        try:
            params_out["drop_rate"] = _map_values(d, lambda x: 1 - x)
        except RecipeError:
            raise RecipeError(f"{source}: parameters.density: expected a number in [0, 1], a list of them or "
                              f"filters, got {d!r}") from None
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
    _dtypes(data, recipe, diffs)
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


def _merge_scopes(key: str, where: str, *scopes: Any) -> Any:
    """Several mergekit scopes of one parameter (highest precedence first) as one mergekit setting."""
    entries = _scoped_entries(key, where, scopes)
    if not entries:
        return None
    if entries[0][0] is None:
        return entries[0][1]
    return [{"value": v} if f is None else {"filter": f, "value": v} for f, v in entries]


_SLICE_KEYS = {"slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "tokenizer", "chat_template"}
_NO_BASE = "\0no base"  # a base name no source has: every source stays an input (linear)


def _translate_slices(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """A mergekit ``slices`` recipe -> omnimerge's (see :mod:`omnimerge.slices`): each slice's parameters
    resolved over mergekit's scopes (source, slice, top level) by :func:`translate`'s rules."""
    if "models" in data:
        raise RecipeError(f"{source}: models: mergekit takes exactly one of models, slices or modules")
    unknown = set(data) - _SLICE_KEYS
    if unknown:
        raise RecipeError(f"{source}: {sorted(unknown)[0]}: unknown mergekit key")
    method = data.get("merge_method")
    if method != "passthrough" and (not isinstance(method, str) or method not in METHODS):
        raise RecipeError(f"{source}: merge_method: expected passthrough or one of mergekit's methods "
                          f"({', '.join(sorted(METHODS))}), got {method!r}")
    for key in ("tokenizer_source", "tokenizer", "chat_template"):
        if data.get(key) not in (None, "base"):
            raise RecipeError(f"{source}: {key}: not supported with slices yet (the base's files are copied)")
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError(f"{source}: slices: a list of slices (each with sources) is required")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise RecipeError(f"{source}: base_model: expected a model path or hub id, got {base!r}")
    top = _mapping(data.get("parameters"), f"{source}: parameters")
    diffs: list[str] = []
    out_slices: list[dict[str, Any]] = []
    for i, sl in enumerate(slices):
        where = f"{source}: slices[{i}]"
        if not isinstance(sl, dict) or set(sl) - {"sources", "base_model", "parameters", "residual_weight"}:
            raise RecipeError(f"{where}: expected a mapping with sources (and base_model, parameters)")
        if sl.get("residual_weight") is not None:
            raise RecipeError(f"{where}.residual_weight: mergekit declares it but never uses it; not supported")
        srcs = sl.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise RecipeError(f"{where}.sources: a list of sources (model, layer_range) is required")
        for j, s in enumerate(srcs):
            lr = s.get("layer_range") if isinstance(s, dict) else None
            if not isinstance(s, dict) or not isinstance(s.get("model"), str) or set(s) - {"model", "layer_range",
                                                                                            "parameters"}:
                raise RecipeError(f"{where}.sources[{j}]: expected a mapping with model and layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in lr)):
                raise RecipeError(f"{where}.sources[{j}].layer_range: expected [first, stop] (two integers), "
                                  f"got {lr!r}")
        sparams = _mapping(sl.get("parameters"), f"{where}.parameters")
        sbase = sl.get("base_model") or base
        entry: dict[str, Any] = {"sources": []}
        if method == "passthrough":
            for j, s in enumerate(srcs):
                own = _mapping(s.get("parameters"), f"{where}.sources[{j}].parameters")
                keys = set(own) | set(sparams) | set(top)
                if keys - {"scale"}:
                    raise RecipeError(f"{where}.sources[{j}].parameters: passthrough takes only scale, got "
                                      f"{sorted(keys - {'scale'})}")
                scale = _combine("scale", where, own.get("scale"), sparams.get("scale"), top.get("scale"))
                entry["sources"].append({"model": s["model"], "layer_range": list(s["layer_range"]),
                                         **({"parameters": {"scale": scale}} if scale is not None else {})})
            out_slices.append(entry)
            continue
        shared = {k: v for k in dict.fromkeys([*sparams, *top])
                  if (v := _merge_scopes(k, where, sparams.get(k), top.get(k))) is not None}
        base_free = method == "linear"
        mk = {"merge_method": method, "base_model": _NO_BASE if base_free else sbase, "parameters": shared,
              "models": [{"model": s["model"], "parameters": s.get("parameters") or {}} for s in srcs]}
        if not base_free and not sbase:
            raise RecipeError(f"{where}: base_model: mergekit's {method} needs a base model among the sources")
        if not base_free and not any(s["model"] == sbase for s in srcs):
            raise RecipeError(f"{where}: base_model '{sbase}' is not among the slice's sources")
        om, d = translate(mk, source)
        diffs += [x for x in d if x not in diffs]
        it = iter(om["models"])
        for s in srcs:
            e: dict[str, Any] = {"model": s["model"], "layer_range": list(s["layer_range"])}
            if base_free or s["model"] != sbase:
                p = next(it).get("parameters")
                if p:
                    e["parameters"] = p
            entry["sources"].append(e)
        if not base_free:
            entry["base_model"] = sbase
        entry["parameters"] = om["parameters"]
        out_slices.append(entry)
        recipe_method = om["merge_method"]
    ref = base or slices[0]["sources"][0]["model"]
    if not base:
        diffs.append(f"base_model: none given: the output's config and files come from the first slice's first "
                     f"source '{ref}' (mergekit takes one of the models in an unspecified order)")
    recipe: dict[str, Any] = {"base_model": str(ref), "merge_method": "passthrough" if method == "passthrough"
                              else recipe_method, "slices": out_slices}
    _dtypes(data, recipe, diffs)
    return recipe, diffs


#: mergekit's module names (its multimodal architecture definitions) -> omnimerge's components
MODULES: dict[str, tuple[str, ...]] = {
    "text_decoder": ("language_model", "embedding", "lm_head", "norm", "bias", "other"),
    "vision_tower": ("vision_tower",),
    "multi_modal_projector": ("projector",),
}


def _by_component(values: dict[str, Any]) -> Any:
    """One parameter's omnimerge value per module -> one value: itself where every module has the same, else
    filters whose entries carry each module's components (a module without a value takes the default)."""
    vals = list(values.values())
    if all(v == vals[0] for v in vals):
        return vals[0]
    entries: list[dict[str, Any]] = []
    for module, v in values.items():
        for comp in MODULES[module]:
            if v is None:
                continue
            if isinstance(v, dict) and "filters" in v:
                entries += [{**e, "component": comp} for e in v["filters"]]
                if "other" in v:
                    entries.append({"component": comp, "value": v["other"]})
            else:
                entries.append({"component": comp, "value": v})
    return {"filters": entries}


def _translate_modules(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """A mergekit ``modules`` recipe -> an omnimerge models recipe: each module translated as a models recipe
    (its scopes: model, module, top level), the modules' values joined by component (see :data:`MODULES`)."""
    for key in ("models", "slices"):
        if key in data:
            raise RecipeError(f"{source}: {key}: mergekit takes exactly one of models, slices or modules")
    mods = data.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise RecipeError(f"{source}: modules: expected a mapping of module names ({', '.join(MODULES)}) to "
                          f"their models")
    top = _mapping(data.get("parameters"), f"{source}: parameters")
    per: dict[str, dict[str, Any]] = {}
    order: list[Any] = []
    diffs: list[str] = []
    for name, m in mods.items():
        where = f"{source}: modules.{name}"
        if name not in MODULES:
            raise RecipeError(f"{where}: not a module omnimerge maps onto its components (it maps "
                              f"{', '.join(MODULES)})")
        if not isinstance(m, dict) or set(m) - {"models", "slices", "parameters"}:
            raise RecipeError(f"{where}: expected a mapping with models (and parameters)")
        if m.get("slices"):
            raise RecipeError(f"{where}.slices: layer ranges inside one module of a multimodal model have no "
                              f"omnimerge equivalent (slices run on models with one layer stack)")
        models = m.get("models")
        if not isinstance(models, list) or not models:
            raise RecipeError(f"{where}.models: a list of models is required")
        names = [x.get("model") if isinstance(x, dict) else x for x in models]
        if order and names != order:
            raise RecipeError(f"{where}.models: {names} differ from modules.{next(iter(mods))}'s {order}; "
                              f"omnimerge merges one list of models for every component")
        order = names
        mparams = _mapping(m.get("parameters"), f"{where}.parameters")
        shared = {k: v for k in dict.fromkeys([*mparams, *top])
                  if (v := _merge_scopes(k, where, mparams.get(k), top.get(k))) is not None}
        sub = {k: v for k, v in data.items() if k != "modules"}
        om, d = translate({**sub, "models": models, "parameters": shared}, source)
        diffs += [x for x in d if x not in diffs]
        per[name] = om
    first = next(iter(per.values()))
    recipe = {**first, "models": [dict(e) for e in first["models"]]}
    for i, entry in enumerate(recipe["models"]):
        keys = dict.fromkeys(k for om in per.values() for k in om["models"][i].get("parameters", {}))
        params = {k: _by_component({n: om["models"][i].get("parameters", {}).get(k) for n, om in per.items()})
                  for k in keys}
        entry.pop("parameters", None)
        if params:
            entry["parameters"] = params
    keys = dict.fromkeys(k for om in per.values() for k in om["parameters"])
    recipe["parameters"] = {k: _by_component({n: om["parameters"].get(k) for n, om in per.items()}) for k in keys}
    if set(mods) != set(MODULES):
        missing = sorted(set(MODULES) - set(mods))
        recipe["select"] = {"include": [c for n in mods for c in MODULES[n]]}
        diffs.append(f"modules: {', '.join(missing)} not listed: mergekit writes none of their tensors (an "
                     f"incomplete checkpoint); omnimerge copies them from the base")
    return recipe, diffs


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
    if recipe.slices is not None:
        return _slices_to_mergekit(recipe)
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
        default = defaults.get(k)
        if k == "drop_rate":  # mergekit's DARE density is the kept fraction
            v = _map_values(v, lambda x: 1 - x)
            default = None if default is None else 1 - default  # type: ignore[operator]
        v = _as_mergekit(v, default)
        if k == "scaling":
            params["lambda"] = v
        elif k == "drop_rate":
            params["density"] = v
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
            entry["parameters"] = {"weight": _as_mergekit(m.parameters.get("weight", defaults.get("weight", 1.0)),
                                                          defaults.get("weight", 1.0))}
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


def _slices_to_mergekit(recipe: Any) -> tuple[dict[str, Any], list[str]]:
    """An omnimerge ``slices`` recipe -> mergekit's: each slice written as :func:`to_mergekit` writes a models
    recipe of its sources (parameters at their effective values), its layer ranges kept."""
    from omnimerge.recipe import validate_recipe

    method = recipe.merge_method
    diffs: list[str] = []
    out_slices: list[dict[str, Any]] = []
    for i, sl in enumerate(recipe.slices):
        if method == "passthrough":
            srcs = []
            for s in sl.sources:
                e: dict[str, Any] = {"model": s.model, "layer_range": list(s.layer_range)}
                if "scale" in s.parameters:
                    e["parameters"] = {"scale": _as_mergekit(s.parameters["scale"], None)}
                srcs.append(e)
            out_slices.append({"sources": srcs})
            continue
        base_free = method == "linear"
        base = sl.base_model or recipe.base_model
        inputs = [s for s in sl.sources if base_free or s.model != base]
        sub = validate_recipe({
            "base_model": sl.sources[0].model if base_free else base,
            "models": [{"model": s.model, "parameters": s.parameters} for s in inputs],
            "merge_method": method, "parameters": {**recipe.parameters, **sl.parameters},
            "modifiers": recipe.modifiers, "dtype": recipe.dtype, "out_dtype": recipe.out_dtype,
            "select": {"include": [".*"]}}, f"slices[{i}]")  # slices merge every tensor
        mk, d = to_mergekit(sub)
        diffs += [x for x in d if x not in diffs]
        by_model = iter(mk["models"])
        srcs = []
        for s in sl.sources:
            e = {"model": s.model, "layer_range": list(s.layer_range)}
            if base_free or s.model != base:
                p = next(by_model).get("parameters")
                if p:
                    e["parameters"] = p
            srcs.append(e)
        entry: dict[str, Any] = {"sources": srcs}
        if not base_free:
            entry["base_model"] = base
        if mk.get("parameters"):
            entry["parameters"] = mk["parameters"]
        out_slices.append(entry)
    out: dict[str, Any] = {"merge_method": TO_MERGEKIT.get(method, method), "base_model": recipe.base_model,
                           "slices": out_slices, "dtype": recipe.dtype}
    if method != "passthrough" and method not in TO_MERGEKIT:
        raise RecipeError(f"recipe: merge_method: '{method}' has no mergekit equivalent")
    if recipe.out_dtype:
        out["out_dtype"] = recipe.out_dtype
    return out, diffs
