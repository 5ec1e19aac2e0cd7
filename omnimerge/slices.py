"""Layer-range merges (mergekit's ``slices``): frankenmerges and per-slice merges, streamed into one checkpoint.

A recipe with ``slices`` builds the output's decoder layers run by run::

    base_model: a                      # the output's config, tokenizer and other files come from it
    merge_method: passthrough          # or any method: each slice's sources are merged
    slices:
      - sources: [{model: a, layer_range: [0, 3]}]
      - sources: [{model: b, layer_range: [2, 4]}]   # overlapping ranges are fine

What it computes, as mergekit 0.1.5 does (``mergekit/plan.py``):

* the slices' layers are concatenated in order and renumbered from 0; output layer ``o`` of a slice is, per
  source, that source's layer ``first + (o - slice start)``; every source of a slice covers as many layers;
* tensors outside the layer stack: the embeddings come from the first slice's sources, every other one (final
  norm, lm_head) from the last slice's, merged with the method like a layer (passthrough: copied);
* a slice with several sources is merged with the recipe's method, the slice's ``base_model`` (default the
  recipe's) being the base when it is among the sources (``linear`` needs none: every source is averaged);
  parameters: a source's own, then the slice's, then the recipe's, key by key; a gradient runs over the slice's
  layers, t = i / (n - 1) (a one-layer slice takes t = 1), outside the layers t = 0;
* passthrough copies each tensor byte for byte (``scale``: a per-source factor, as mergekit's);
* the output's ``config.json`` is base_model's with the layer count (``num_hidden_layers``) set to the sum of
  the slices' lengths (and ``layer_types``, where the config has one, taken layer by layer from the sources).

Each slice is one :class:`~omnimerge.engine.MergeRun` over :class:`~omnimerge.checkpoint.reader.RenamedCheckpoint`
views of its sources (the source layers under their output names), streaming into one preplanned writer: memory
stays bounded by the largest tensors, as in every merge, and the output is written atomically.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from omnimerge.checkpoint.files import FileHasher, copy_auxiliary, hash_algorithm, write_model_card
from omnimerge.checkpoint.reader import Checkpoint, RenamedCheckpoint, element_size, resolve_model_path
from omnimerge.checkpoint.sources import FullSource
from omnimerge.checkpoint.writer import AtomicOutput, ShardedWriter, check_output_apart, parse_size
from omnimerge.components import classify
from omnimerge.errors import OutputError, RecipeError
from omnimerge.executor import Notes
from omnimerge.methods import get_method
from omnimerge.methods.base import Param, at_depth
from omnimerge.options import MergeOptions
from omnimerge.plan import DTYPES
from omnimerge.recipe import Recipe, SliceEntry, validate_recipe
from omnimerge.report import MergeReport

__all__ = ["PASSTHROUGH", "merge_slices"]

#: the only method that is not a merge: each slice has one source, copied
PASSTHROUGH = "passthrough"
#: methods whose result does not depend on a base (every source is an input)
_BASE_FREE = {"linear"}
_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)\.(.+)$")
_SCALE = Param("scale", None, "passthrough: a factor on the copied tensor", float, nullable=True)


@dataclass(frozen=True)
class _Passthrough:
    """What the model card says of a passthrough merge."""

    name: str = PASSTHROUGH
    summary: str = "each output layer copied from its source layer (mergekit's passthrough, frankenmerges)"
    paper: str = "mergekit `passthrough` (Goddard et al., Arcee's MergeKit, EMNLP 2024 Industry, arXiv 2403.13257)"
    url: str = "https://arxiv.org/abs/2403.13257"


@dataclass
class _Stack:
    prefix: str
    depth: int


def _stack(ckpt: Checkpoint, where: str) -> _Stack:
    """The checkpoint's one layer stack (prefix, depth); slices need exactly one (mergekit: one module)."""
    found: dict[str, int] = {}
    for name in ckpt.tensors:
        m = _LAYER.match(name)
        if m is not None:
            found[m.group(1)] = max(found.get(m.group(1), 0), int(m.group(2)) + 1)
    if len(found) != 1:
        what = "no layer stack" if not found else f"{len(found)} layer stacks ({', '.join(sorted(found))})"
        raise RecipeError(f"{where}: '{ckpt.ref}' has {what}; slices take the layers of a model with one stack "
                          f"(a multimodal model's modules have no omnimerge slices yet)")
    (prefix, depth), = found.items()
    return _Stack(prefix, depth)


def _layer_names(ckpt: Checkpoint, stack: _Stack, layer: int) -> list[str]:
    """The suffixes of layer ``layer``'s tensors (after ``prefix<layer>.``), in file order."""
    head = f"{stack.prefix}{layer}."
    return [n[len(head):] for n in ckpt.tensors if n.startswith(head)]


class _Forward:
    """A sink that forwards into the shared writer; the writer is finished once, after every slice."""

    def __init__(self, writer: ShardedWriter) -> None:
        self.writer = writer
        self.whole_tensors = writer.whole_tensors

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor)

    def write_part(self, name: str, part: torch.Tensor, start: int, last: bool) -> None:
        self.writer.write_part(name, part, start, last)

    def patch(self, name: str, index: Any, values: torch.Tensor) -> None:
        self.writer.patch(name, index, values)

    def copy_raw(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        self.writer.copy_raw(name, src_fd, src_offset, nbytes)

    def finish(self) -> list[Path]:
        return []

    def close(self) -> None:
        return None


@dataclass
class _Group:
    """One slice's part of the output: its tensors (output names, in order), their views and depth t."""

    index: int
    names: list[str]
    base: RenamedCheckpoint
    experts: list[tuple[RenamedCheckpoint, dict[str, Any]]]
    t: dict[str, float]
    recipe: Recipe | None = None  # None: passthrough
    scale: list[Any] | None = None  # passthrough: the source's scale setting


class _Slicer:
    def __init__(self, recipe: Recipe, options: MergeOptions) -> None:
        self.r = recipe
        self.o = options
        self.method = recipe.merge_method
        self.opened: dict[Path, Checkpoint] = {}
        self.stacks: dict[Path, _Stack] = {}

    def open(self, ref: str, where: str) -> Checkpoint:
        path = resolve_model_path(ref, self.r.base_path).resolve()
        if path not in self.opened:
            self.opened[path] = Checkpoint(path, ref)
            self.stacks[path] = _stack(self.opened[path], where)
        return self.opened[path]

    def stack(self, ckpt: Checkpoint) -> _Stack:
        return self.stacks[ckpt.path.resolve()]

    def same(self, a: str, b: str | None) -> bool:
        if b is None:
            return False
        try:
            return resolve_model_path(a, self.r.base_path).resolve() == resolve_model_path(b, self.r.base_path).resolve()
        except Exception:  # noqa: BLE001 - an unresolvable name is compared as written
            return a == b

    def check(self) -> None:
        """Every slice checked before any work (mergekit's refusals, one line each)."""
        assert self.r.slices is not None
        for i, sl in enumerate(self.r.slices):
            lengths = []
            for j, src in enumerate(sl.sources):
                where = f"slices[{i}].sources[{j}]"
                a, b = src.layer_range
                ckpt = self.open(src.model, where)
                depth = self.stack(ckpt).depth
                if not 0 <= a < b:
                    raise RecipeError(f"{where}.layer_range: [{a}, {b}] is not a range of layers (expected "
                                      f"[first, stop) with 0 <= first < stop)")
                if b > depth:
                    raise RecipeError(f"{where}.layer_range: [{a}, {b}] goes past the last layer of "
                                      f"'{src.model}' (it has {depth} layers: [0, {depth}) at most)")
                lengths.append(b - a)
            if len(set(lengths)) > 1:
                raise RecipeError(f"slices[{i}]: its sources cover different numbers of layers ({lengths}); every "
                                  f"source of a slice gives the same number")
            if self.method == PASSTHROUGH and len(sl.sources) != 1:
                raise RecipeError(f"slices[{i}]: passthrough copies one source per slice, got {len(sl.sources)} "
                                  f"(merge them with another merge_method)")
            if self.method == PASSTHROUGH:
                extra = set(sl.sources[0].parameters) - {"scale"}
                if extra or sl.parameters:
                    raise RecipeError(f"slices[{i}]: passthrough takes only a per-source 'scale', got "
                                      f"{sorted(extra or sl.parameters)}")

    def groups(self) -> list[_Group]:
        assert self.r.slices is not None
        slices = self.r.slices
        out: list[_Group] = []
        o = 0
        first_ref = self.open(slices[0].sources[0].model, "slices[0].sources[0]")
        last_ref = self.open(slices[-1].sources[0].model, f"slices[{len(slices) - 1}].sources[0]")
        outside = {n: m for n, m in first_ref.tensors.items() if _LAYER.match(n) is None}
        pre = [n for n, m in outside.items() if classify(n, m.shape) == "embedding"]
        post = [n for n, m in last_ref.tensors.items() if _LAYER.match(n) is None and n not in pre]
        out_stack = self.stack(first_ref)
        for i, sl in enumerate(slices):
            n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            ref = self.open(sl.sources[0].model, f"slices[{i}].sources[0]")
            # per output tensor of this slice: (output name, per source its name), and its depth t
            rows: list[tuple[str, list[str]]] = []
            t: dict[str, float] = {}
            for name in pre if i == 0 else []:
                rows.append((name, [name] * len(sl.sources)))
                t[name] = 0.0
            for idx in range(n):
                a0 = sl.sources[0].layer_range[0]
                for suffix in _layer_names(ref, self.stack(ref), a0 + idx):
                    out_name = f"{out_stack.prefix}{o + idx}.{suffix}"
                    names = []
                    for src in sl.sources:
                        st = self.stack(self.open(src.model, ""))
                        names.append(f"{st.prefix}{src.layer_range[0] + idx}.{suffix}")
                    rows.append((out_name, names))
                    t[out_name] = idx / (n - 1) if n > 1 else 1.0  # mergekit: a one-layer slice has t = 1
            for name in post if i == len(slices) - 1 else []:
                rows.append((name, [name] * len(sl.sources)))
                t[name] = 0.0
            o += n
            views = []
            for j, src in enumerate(sl.sources):
                ckpt = self.open(src.model, f"slices[{i}].sources[{j}]")
                views.append(RenamedCheckpoint(ckpt, {out: names[j] for out, names in rows},
                                               ref=f"{src.model}[{src.layer_range[0]}:{src.layer_range[1]}]"))
            out.append(self._group(i, sl, [r[0] for r in rows], views, t))
        return out

    def _group(self, i: int, sl: SliceEntry, names: list[str], views: list[RenamedCheckpoint],
               t: dict[str, float]) -> _Group:
        if self.method == PASSTHROUGH:
            return _Group(i, names, views[0], [], t, scale=[sl.sources[0].parameters.get("scale")])
        base_ref = sl.base_model or self.r.base_model
        at = next((j for j, s in enumerate(sl.sources) if self.same(s.model, base_ref)), None)
        if self.method in _BASE_FREE:
            bj, experts = 0, list(range(len(sl.sources)))
        elif at is None:
            raise RecipeError(f"slices[{i}]: base_model '{base_ref}' is not among the slice's sources; "
                              f"'{self.method}' merges the sources' differences from a base, so list it there")
        else:
            bj, experts = at, [j for j in range(len(sl.sources)) if j != at]
        if not experts:
            raise RecipeError(f"slices[{i}]: only the base model among its sources; nothing to merge it with")
        sub = validate_recipe({
            "base_model": sl.sources[bj].model,
            "models": [{"model": sl.sources[j].model, "parameters": sl.sources[j].parameters} for j in experts],
            "merge_method": self.method, "parameters": {**self.r.parameters, **sl.parameters},
            "modifiers": self.r.modifiers, "select": {"include": [".*"]}, "dtype": self.r.dtype,
            "out_dtype": self.r.out_dtype}, f"slices[{i}]", self.r.base_path)
        return _Group(i, names, views[bj], [(views[j], sl.sources[j].parameters) for j in experts], t, sub)


def _out_dtype(recipe: Recipe, dtype: torch.dtype) -> torch.dtype:
    return DTYPES[recipe.out_dtype] if recipe.out_dtype and dtype.is_floating_point else dtype


def _patch_config(folder: Path, total: int, layer_types: list[Any] | None) -> None:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    holder = cfg if "num_hidden_layers" in cfg else cfg.get("text_config")
    if not isinstance(holder, dict) or "num_hidden_layers" not in holder:
        raise RecipeError(f"{cfg_path}: no num_hidden_layers to set to the output's {total} layers")
    holder["num_hidden_layers"] = total
    if layer_types is not None and isinstance(holder.get("layer_types"), list):
        holder["layer_types"] = layer_types
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def merge_slices(recipe: Recipe, output: str | Path, options: MergeOptions | None = None) -> MergeReport:
    """Run a recipe with ``slices`` into the folder ``output`` (atomically); see the module's docstring."""
    from omnimerge.engine import MergeRun

    o = options or MergeOptions()
    out = Path(output).expanduser().absolute()
    notes = Notes(o.echo)
    for d in recipe.differences:
        notes(d)
    if recipe.output != "full" or recipe.mode != "capability" or recipe.task_models:
        raise RecipeError("slices: only with output: full and mode: capability (one merged checkpoint)")
    if recipe.merge_method != PASSTHROUGH:
        get_method(recipe.merge_method)  # an unknown method is refused by name before any file is opened
    t0 = time.perf_counter()
    sl = _Slicer(recipe, o)
    try:
        sl.check()
        ref = sl.open(recipe.base_model, "base_model")
        check_output_apart(out, [(f"model '{c.ref}'", p) for p, c in sl.opened.items()])
        if out.exists() and not o.overwrite:
            raise OutputError(f"{out}: already exists (use --overwrite to replace it)")
        groups = sl.groups()
        runs: list[MergeRun | None] = []
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        merged = 0
        for g in groups:
            if g.recipe is None:
                runs.append(None)
                plan += [(n, _out_dtype(recipe, g.base.tensors[n].dtype), tuple(g.base.tensors[n].shape))
                         for n in g.names]
                continue
            run = MergeRun(g.recipe, None, replace(o, echo=notes))
            run.use_inputs(g.base, [FullSource(v, f"{Path(v.path).name}") for v, _ in g.experts])
            run.depth_fraction = g.t.__getitem__
            jobs = {j.name: j for j in run.plan()}
            plan += [(n, jobs[n].out_dtype, tuple(jobs[n].meta.shape)) for n in g.names]
            merged += sum(jobs[n].merged for n in g.names)
            runs.append(run)
        layer_types = _layer_types(sl, groups)
        alg = hash_algorithm(o.hash_inputs)
        files = sorted({f for c in sl.opened.values() for f in c.files})
        hasher = FileHasher(files, algorithm=alg).start() if alg else None
        with AtomicOutput(out, o.overwrite, notes) as atomic:
            tmp = atomic.folder()
            writer = ShardedWriter(tmp, plan, parse_size(recipe.shard_size),
                                   metadata={"omnimerge_method": recipe.merge_method}, sync=o.sync)
            try:
                for g, run in zip(groups, runs, strict=True):
                    if run is None:
                        _copy(g, writer, recipe)
                    else:
                        run.merge_into(_Forward(writer))
                shards = writer.finish()
            finally:
                writer.close()
            copy_auxiliary(ref.path, tmp, recipe.out_dtype)
            total = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices or [])
            _patch_config(tmp, total, layer_types)
            report = MergeReport(
                output=out, method=recipe.merge_method, parameters=dict(recipe.parameters),
                seconds=time.perf_counter() - t0, merged=merged, copied=len(plan) - merged,
                input_bytes=sum(f.stat().st_size for f in files),
                output_bytes=sum(element_size(d) * int(torch.Size(s).numel()) for _, d, s in plan),
                shards=[p.name for p in shards], notes=list(notes.seen))
            digests = hasher.join() if hasher else {}
            inputs = [("base" if c.path == ref.path else "model", c.ref,
                       [(f.name, digests.get(str(f), "not hashed")) for f in c.files]) for c in sl.opened.values()]
            method = _Passthrough() if recipe.merge_method == PASSTHROUGH else get_method(recipe.merge_method)
            write_model_card(tmp, recipe.to_yaml(), method, inputs, report.__dict__,
                             differences=recipe.differences)
            atomic.commit()
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        for c in sl.opened.values():
            c.close()


def _layer_types(sl: _Slicer, groups: list[_Group]) -> list[Any] | None:
    """The output's per-layer ``layer_types`` (each from its source layer's config), where the configs have them."""
    assert sl.r.slices is not None
    out: list[Any] = []
    for s in sl.r.slices:
        src = s.sources[0]
        cfg = sl.open(src.model, "").config
        lt = cfg.get("layer_types") if "layer_types" in cfg else (cfg.get("text_config") or {}).get("layer_types")
        if not isinstance(lt, list):
            return None
        out += lt[src.layer_range[0]:src.layer_range[1]]
    return out


def _copy(g: _Group, writer: ShardedWriter, recipe: Recipe) -> None:
    """Passthrough: each tensor byte for byte from its source (times ``scale``, resolved per tensor, if set)."""
    scale = _SCALE.validate(g.scale[0], f"slices[{g.index}].sources[0].parameters") \
        if g.scale and g.scale[0] is not None else None
    for name in g.names:
        meta = g.base.tensors[name]
        dtype = _out_dtype(recipe, meta.dtype)
        s = at_depth({"scale": scale}, g.t[name], name=name)["scale"] if scale is not None else None
        raw = g.base.raw_source(name)
        if (s is None or s == 1.0) and dtype == meta.dtype and raw is not None:
            writer.copy_raw(name, *raw)
            continue
        x = g.base.read(name)
        if s is not None and s != 1.0 and meta.dtype.is_floating_point:
            x = x.to(DTYPES[recipe.dtype]) * s
        writer.write(name, x.to(dtype))
