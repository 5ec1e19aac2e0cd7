"""The streaming merge engine: :class:`MergeRun`, and the strategies that merge one tensor.

The parts: :mod:`omnimerge.options` (how a merge runs), :mod:`omnimerge.plan` (one job per tensor),
opened inputs (:mod:`omnimerge.checkpoint.sources`), the strategies (here: chosen in ``MergeRun._merge_job`` from
the method's declared :class:`~omnimerge.methods.base.Capabilities`), :mod:`omnimerge.executor` (worker threads
under a memory budget), :mod:`omnimerge.sinks` (where merged tensors go) and :mod:`omnimerge.report`.

Plan, then stream:

1. **Validate everything before touching a tensor**: the recipe against the method's declared parameters,
   every input's headers (files, shapes, architecture), the output path.
2. **Plan** one job per base tensor, in the base's file order: merged (selected by the recipe) or copied.
   The output's shard layout is fixed from the plan (see :class:`~omnimerge.checkpoint.writer.ShardedWriter`).
3. **Global passes** for methods that need statistics over all merged tensors (global TIES, OptMerge's
   ``variant: auto``), streaming over the inputs.
4. **Stream**: worker threads run jobs concurrently under a memory budget (about ``(T + 3)`` times the largest
   merged tensor in the compute dtype); each job reads its inputs (memory-mapped), computes, and writes its
   output bytes straight into the sink (a shard file, memory, a loaded model). Copied tensors are copied byte
   for byte in the kernel.
5. **Finish**: check every planned tensor was written, copy config/tokenizer/processor files, write the model
   card (with a digest of every input file, hashed on a background thread), then rename the temporary folder
   into place. Any failure removes the temporary folder: nothing is left at the output path.

Results do not depend on the number of workers or their scheduling: each tensor is computed independently
(randomised methods draw from a generator seeded by (seed, tensor name)) and written at a fixed place.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from omnimerge.checkpoint import vocabulary
from omnimerge.checkpoint.files import FileHasher, copy_auxiliary, hash_algorithm, write_model_card
from omnimerge.checkpoint.names import canonical_name
from omnimerge.checkpoint.reader import (
    Checkpoint,
    element_size,
    open_checkpoint,
    resolve_model_path,
)
from omnimerge.checkpoint.sources import ExpertSource, FullSource, open_expert
from omnimerge.checkpoint.statistics import StatisticsFile, open_statistics, weights_digest
from omnimerge.checkpoint.writer import AtomicOutput, ShardedWriter, check_output_apart, parse_size
from omnimerge.components import Selector, classify
from omnimerge.errors import (
    CheckpointError,
    NonFiniteTensorError,
    OmniMergeError,
    OutputError,
    RecipeError,
    quoted,
)
from omnimerge.executor import Notes, execute
from omnimerge.kernels import CHUNK as KERNEL_CHUNK
from omnimerge.kernels import LinearBlocks, TiesBlocks
from omnimerge.kernels import preload as preload_kernels
from omnimerge.kernels import ready as kernels_ready
from omnimerge.methods import MergeMethod, TensorContext, get_method, registry
from omnimerge.methods.base import Filters, at_depth, has_schedule, plain
from omnimerge.methods.modifiers import compose
from omnimerge.options import MergeOptions
from omnimerge.plan import DTYPES, Job, layer_of
from omnimerge.recipe import Recipe
from omnimerge.report import MergeReport, component_counts
from omnimerge.sinks import ModelSink, Sink, StateDictSink
from omnimerge.task_models import TASK_DIR, TaskMaskWriter

__all__ = ["DTYPES", "FUSED_BLOCK", "Job", "MergeReport", "MergeRun"]

#: elements per block in the fused elementwise path (the T + 2 float32 blocks stay in a core's L2 cache)
FUSED_BLOCK = 1 << 16

def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite. One sum decides (NaN and Inf propagate into it, and it costs a
    fraction of ``isfinite(t).all()``); only a non-finite sum (a NaN/Inf entry, or finite entries whose sum
    overflows) falls back to the exact elementwise test."""
    if t.is_floating_point() and math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())




def _device(device: str | torch.device | None) -> torch.device:
    where = f"--device {quoted(str(device), 40)}"
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, ValueError, TypeError):
        raise RecipeError(f"{where}: not a device (expected cpu, cuda, cuda:N or mps)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise RecipeError(f"{where}: merges run on cpu, cuda or mps, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"{where}: no CUDA device is available (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RecipeError(f"{where}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RecipeError(f"{where}: no MPS device is available")
    return dev


class MergeRun:
    """One merge: built from a validated recipe and :class:`MergeOptions`.

    :meth:`run` writes a checkpoint folder (``output``); :meth:`merge_into` streams the merge into any
    :class:`~omnimerge.sinks.Sink` (memory included) with no files written. The parts other merges build on
    (modality merging, the LoRA output, :class:`omnimerge.api.Merger`) are public: :meth:`open` /
    :meth:`use_inputs`, :meth:`plan`, :meth:`global_stats`, :meth:`stream`, :meth:`whole_tensor_delta`,
    :meth:`progress_iter`, :meth:`set_parameters`, :meth:`close`.
    """

    def __init__(self, recipe: Recipe, output: str | Path | None, options: MergeOptions | None = None) -> None:
        o = options or MergeOptions()
        self.options = o
        if recipe.slices is not None:
            raise RecipeError("slices: a layer-range merge is written to a folder (omnimerge.merge, `omnimerge "
                              "merge`), not merged in memory")
        #: where a schedule takes a tensor's depth t from, by name (None: layer / (depth - 1))
        self.depth_fraction: Callable[[str], float] | None = None
        self.recipe = recipe
        self.output = Path(output).expanduser().absolute() if output is not None else None
        self.overwrite = o.overwrite
        self.device = _device(o.device)
        self.workers = o.workers or min(4, os.cpu_count() or 1)
        self.progress = o.progress
        self.notes = Notes(o.echo)
        for diff in recipe.differences:  # a translated (mergekit) recipe's stated differences
            self.notes(diff)
        self.check_finite = o.check_finite
        self.use_kernels = o.use_kernels  # compiled fused kernels where they apply (see omnimerge.kernels)
        self.sync = o.sync  # fsync the output before it is committed
        self.strategy = o.strategy
        self.hash_algorithm = hash_algorithm(o.hash_inputs)  # None: no input digests in the model card
        self.method: MergeMethod = compose(get_method(recipe.merge_method), recipe.modifiers)
        self.caps = self.method.capabilities
        if self.method.output_kind == "online" and recipe.mode != "modality":  # see omnimerge.modality
            raise RecipeError(f"merge_method: '{self.method.name}' keeps the experts' adapters apart (no merged "
                              f"model); use it with mode: modality")
        self.kwargs = self.method.resolve(recipe.parameters, [m.parameters for m in recipe.models])
        spec = self.method.statistics
        if spec is not None and recipe.mode != "capability":
            raise RecipeError(f"mode: method '{self.method.name}' reads per-expert statistics, which modality "
                              f"merging does not pass on yet; use mode: capability")
        for i, m in enumerate(recipe.models):
            if spec is not None and not m.statistics:
                raise RecipeError(f"models[{i}].statistics: method '{self.method.name}' needs each expert's "
                                  f"'{spec.kind}' statistics file (collect it with `omnimerge stats`)")
            if spec is None and m.statistics:
                users = sorted(n for n, mm in registry().items() if mm.statistics)
                raise RecipeError(f"models[{i}].statistics: method '{self.method.name}' uses no statistics "
                                  f"(data-aware methods do: {', '.join(users)})")
        #: per expert, its opened statistics file (data-aware methods; see _open_statistics)
        self.stat_files: list[StatisticsFile] = []
        self.compute_dtype = DTYPES[recipe.dtype]
        self.out_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else None
        self.selector = Selector(recipe.select.include, recipe.select.exclude)
        self.shard_bytes = parse_size(recipe.shard_size)
        if self.shard_bytes <= 0:
            raise RecipeError(f"shard_size: must be positive, got {recipe.shard_size!r}")
        if recipe.tokenizer is not None and (recipe.output != "full" or recipe.mode != "capability"):
            raise RecipeError("tokenizer: a new vocabulary is built for one full merged model only (output: full, "
                              "mode: capability)")
        if recipe.output == "lora" and recipe.rank is None:
            raise RecipeError("rank: required with output: lora (the rank of the merged adapter)")
        #: with the recipe's task_models: the per-task masks being written (see omnimerge.task_models)
        self._task_masks: Any = None
        if recipe.task_models:
            if self.caps.task_masks is None:
                have = sorted(n for n, m in registry().items() if m.capabilities.task_masks is not None)
                raise RecipeError(f"task_models: method '{self.method.name}' has no per-task masks (methods that "
                                  f"do: {', '.join(have)})")
            if recipe.output != "full" or recipe.mode != "capability":
                raise RecipeError("task_models: only with output: full and mode: capability (one unified model)")
            if has_schedule(self.kwargs):
                raise RecipeError("task_models: give single parameter values (the masks' loader rebuilds every "
                                  "tensor with one scaling)")
            self.strategy = "whole"  # the masks are computed from each tensor's whole task vectors
        self.resume = o.resume
        if o.resume and (recipe.output != "full" or recipe.task_models or recipe.mode != "capability"):
            what = ("output: lora" if recipe.output != "full" else "task_models" if recipe.task_models
                    else f"mode: {recipe.mode}")
            raise RecipeError(f"--resume: only merges into one checkpoint folder can be resumed, not {what} "
                              f"(run it again without --resume)")
        if self.output is not None:
            check_output_apart(self.output, self._input_folders())
        if self.output is not None and self.output.exists() and not self.overwrite:
            raise OutputError(f"{self.output}: already exists (use --overwrite to replace it)")
        self.base: Checkpoint | None = None
        self.experts: list[ExpertSource] = []
        self.files_src: Path | None = None
        self._counts: dict[str, int] = {}
        self._counts_lock = threading.Lock()
        #: with options.keep_inputs: per merged tensor, its inputs kept in memory (see _merge_job_kept); None
        #: until decided, False when they do not fit
        self._kept: dict[str, tuple[torch.Tensor | None, list[torch.Tensor], list[Any] | None]] | None | bool = None
        #: with the recipe's tokenizer: the output vocabulary (see omnimerge.checkpoint.vocabulary)
        self.vocab: vocabulary.VocabularyPlan | None = None

    def _input_folders(self) -> list[tuple[str, Path]]:
        """The recipe's input folders (base, experts and adapters, copy_files_from), for the output guard; a
        reference that does not resolve is left to :meth:`open` to report."""
        r = self.recipe
        refs = [("base model", r.base_model)] + [(f"model '{m.model}'", m.model) for m in r.models]
        if r.copy_files_from:
            refs.append(("copy_files_from model", r.copy_files_from))
        if r.tokenizer is not None and r.tokenizer.source not in ("base", "union"):
            refs.append(("tokenizer source", r.tokenizer.source))
        out: list[tuple[str, Path]] = []
        for what, ref in refs:
            try:
                out.append((what, resolve_model_path(ref, r.base_path)))
            except CheckpointError:
                continue
        return out

    def set_parameters(self, parameters: dict[str, Any] | None = None,
                       model_parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Re-resolve the method's parameters for the next merge: ``parameters`` replace top-level values of the
        recipe, ``model_parameters[i]`` those of expert i (checked as the recipe's are); returns them."""
        top = {**self.recipe.parameters, **(parameters or {})}
        per = [m.parameters for m in self.recipe.models]
        if model_parameters is not None:
            if len(model_parameters) != len(per):
                raise RecipeError(f"model_parameters: {len(model_parameters)} entries for {len(per)} experts")
            per = [{**a, **(b or {})} for a, b in zip(per, model_parameters, strict=True)]
        self.kwargs = self.method.resolve(top, per)
        return self.kwargs

    # -- opening and planning ---------------------------------------------------------------------------------
    def use_inputs(self, base: Checkpoint, experts: list[ExpertSource]) -> None:
        """Merge from inputs opened by the caller (modality merging opens its experts itself)."""
        self.base = base
        self.experts = list(experts)
        if self.files_src is None:
            self.files_src = base.path

    def open(self) -> None:
        """Open the base and every expert (headers only; tensors are memory-mapped when read). Idempotent."""
        if self.base is not None:
            return
        r = self.recipe
        self.base = open_checkpoint(r.base_model, r.base_path)
        labels = []
        for i, m in enumerate(r.models):
            label = m.name or Path(m.model.rstrip("/")).name or f"model{i}"
            if label in labels:
                label = f"{label}#{i}"
            labels.append(label)
            self.experts.append(open_expert(m.model, self.base, r.base_path, label))
        self.files_src = resolve_model_path(r.copy_files_from, r.base_path) if r.copy_files_from else self.base.path
        if r.tokenizer is not None:  # every input's vocabulary tensors re-indexed into the output vocabulary
            self.vocab, notes = vocabulary.plan_and_install(
                r.tokenizer, self.base, [s.ckpt if isinstance(s, FullSource) else None for s in self.experts],
                r.base_path, (r.base_model, [m.model for m in r.models]), DTYPES[r.dtype])
            for note in notes:
                self.notes(note)

    def plan(self) -> list[Job]:
        """One job per base tensor, in the base's file order: merged (selected) or copied."""
        assert self.base is not None
        jobs: list[Job] = []
        depth: dict[str, int] = {}  # layer-stack prefix -> number of layers
        for name, meta in self.base.tensors.items():
            comp = classify(name, meta.shape)
            merged = self.selector.selects(name, comp) and meta.dtype.is_floating_point
            if merged and meta.numel == 0:
                merged = False
            out_dtype = meta.dtype
            if self.out_dtype is not None and meta.dtype.is_floating_point:
                out_dtype = self.out_dtype
            job = Job(name, self.base.canonical_of(name), comp, meta, merged, out_dtype)
            where = layer_of(job.canonical)
            if where is not None:
                job.layer = where[1]
                depth[where[0]] = max(depth.get(where[0], 0), job.layer + 1)
            if merged:
                T, es = len(self.experts), element_size(self.compute_dtype)
                job.cost = (T + 3) * meta.numel * es
                spec = self.method.statistics
                want = spec.shape(name, tuple(meta.shape), comp) if spec is not None else None
                if want is not None:  # the experts' statistics, their sum and its factor (float64)
                    job.cost += (T + 4) * math.prod(want) * 8
                if meta.numel >= FUSED_BLOCK and self._fusable():
                    job.cost, job.streaming = (T + 3) * FUSED_BLOCK * es + 4 * KERNEL_CHUNK, True  # a few blocks
                elif self._blockwise(job) is not None:
                    # blocks, plus the magnitudes kept between sweeps (a few percent per expert)
                    job.cost = (T + 8) * FUSED_BLOCK * es + (4 * T + 24) * KERNEL_CHUNK + T * meta.numel * es // 16
                    job.streaming = True
            elif out_dtype != meta.dtype or self.base.raw_source(name) is None:
                job.cost = 2 * meta.numel * max(element_size(out_dtype), element_size(meta.dtype))
            else:
                job.cost = 0
            jobs.append(job)
        scheduled = has_schedule(self.kwargs)
        # the language model's decoder stack(s): the layer stacks that hold language-model linear weights (layer
        # groups, Steps, apply there only; the vision tower's layers are another stack)
        decoder = {w[0] for j in jobs if j.component == "language_model" and (w := layer_of(j.canonical))}
        for job in jobs:
            where = layer_of(job.canonical)
            job.num_layers = depth[where[0]] if where is not None else 0
            if not scheduled:
                job.kwargs = self.kwargs
            elif job.merged:  # mergekit's gradients: t = layer / (depth - 1); outside the layers t = 0
                t = job.layer / (job.num_layers - 1) if job.layer is not None and job.num_layers > 1 else 0.0
                if self.depth_fraction is not None:  # e.g. a slice's own t (omnimerge.slices)
                    t = self.depth_fraction(job.name)
                job.kwargs = at_depth(self.kwargs, t, job.layer, job.num_layers,
                                      where is not None and where[0] in decoder, name=job.name,
                                      component=job.component)
                self._check_filtered(job)
                if self.method.check is not None:
                    self.method.check(job.kwargs)
        if not any(j.merged for j in jobs):
            raise RecipeError(
                f"select: no tensor of the base '{self.recipe.base_model}' matches include="
                f"{list(self.selector.include)} exclude={list(self.selector.exclude)} — nothing would be merged "
                f"(run `omnimerge inspect {self.recipe.base_model}` to see its components)"
            )
        return jobs

    def _check_filtered(self, job: Job) -> None:
        """A required parameter given as filters that none matches for this tensor is refused, naming both."""
        for k, v in self.kwargs.items():
            p = self.method.param(k)
            given = v if isinstance(v, tuple) else (v,)
            got = job.kwargs[k] if isinstance(job.kwargs[k], tuple) else (job.kwargs[k],)
            if p is not None and not p.nullable and any(
                    isinstance(a, Filters) and b is None for a, b in zip(given, got, strict=True)):
                raise RecipeError(f"parameters.{k}: no filter matches tensor '{job.name}' and '{self.method.name}' "
                                  f"has no default for it (add other: VALUE or a filter that matches)")

    # -- per-tensor work ----------------------------------------------------------------------------------------
    def _inputs(self, job: Job) -> tuple[torch.Tensor, list[torch.Tensor], list[Any] | None]:
        assert self.base is not None
        base = self.base.read(job.name).to(device=self.device, dtype=self.compute_dtype, copy=True)
        tvs: list[torch.Tensor] = []
        factors: list[Any] = []
        for src in self.experts:
            tv, lr = src.task_vector(job.name, job.canonical, base, self.compute_dtype, self.device)
            if tv is None:
                tv = torch.zeros_like(base)
            if self.check_finite and not _all_finite(tv):
                self._raise_non_finite(job, src, base)
            tvs.append(tv)
            factors.append(lr)
        return base, tvs, (factors if any(f is not None for f in factors) else None)

    def _raise_non_finite(self, job: Job, src: ExpertSource, base: torch.Tensor) -> None:
        assert self.base is not None
        if not bool(torch.isfinite(base).all()):
            raise NonFiniteTensorError(
                f"base '{self.recipe.base_model}' ({job.meta.file}): tensor '{job.name}' holds NaN or Inf values"
            )
        raise NonFiniteTensorError(
            f"expert '{src.ref}' ({src.path}): tensor '{job.name}' holds NaN or Inf values "
            f"(or values so large that W - W0 overflows {self.recipe.dtype})"
        )

    def _job_statistics(self, job: Job) -> list[torch.Tensor | None] | None:
        """Per expert, the job's statistic from its file (on the compute device), None where the file has none;
        None for methods without statistics."""
        if not self.stat_files or not job.merged:
            return None
        out: list[torch.Tensor | None] = []
        for sf in self.stat_files:
            key = sf.key_of(job.name, job.canonical)
            out.append(None if key is None else sf.read(key).to(self.device))
        return out

    def _open_statistics(self, jobs: list[Job]) -> None:
        """Before any work: open every expert's statistics file and check it against the plan: the kind, a
        statistic of the expected shape for every merged tensor that takes one, no statistic for a tensor the
        base does not have, and (where the file records it) the digest of the weights it was collected on."""
        spec = self.method.statistics
        if spec is None or self.stat_files:
            return
        assert self.base is not None
        r = self.recipe
        names = set(self.base.tensors) | {self.base.canonical_of(n) for n in self.base.tensors}
        files = []
        for i, (m, src) in enumerate(zip(r.models, self.experts, strict=True)):
            who = f"models[{i}].statistics (expert '{m.model}')"
            assert m.statistics is not None
            path = Path(m.statistics).expanduser()
            if not path.is_absolute() and r.base_path is not None:
                path = r.base_path / path
            sf = open_statistics(path, spec.kind, who)
            stray = sorted(k for k in sf.shapes if k not in names and canonical_name(k) not in names)
            if stray:
                raise CheckpointError(f"{who}: {path} has statistics for '{stray[0]}'"
                                      f"{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}, which the base "
                                      f"'{r.base_model}' has no tensor of: statistics of another model")
            for job in jobs:
                if not job.merged:
                    continue
                want = spec.shape(job.canonical, tuple(job.meta.shape), job.component)
                key = sf.key_of(job.name, job.canonical)
                if key is None:
                    if want is not None:
                        raise CheckpointError(f"{who}: {path} has no '{spec.kind}' statistic for tensor "
                                              f"'{job.name}' (expected shape {list(want)})")
                    continue
                if want is None or tuple(sf.shapes[key]) != tuple(want):
                    raise CheckpointError(
                        f"{who}: {path}: statistic '{key}' has shape {list(sf.shapes[key])}, expected "
                        f"{list(want) if want is not None else 'none for this tensor'} for tensor '{job.name}' "
                        f"of shape {list(job.meta.shape)}")
            recorded = sf.metadata.get("weights_digest")
            if recorded:
                algo = recorded.split(":", 1)[0]
                try:
                    actual = weights_digest(src.input_files(), algo)
                except (ImportError, ValueError, OSError) as e:
                    raise CheckpointError(f"{who}: cannot digest the expert's weights to compare with {path} "
                                          f"({e})") from None
                if actual != recorded:
                    raise CheckpointError(
                        f"{who}: {path} was collected on other weights (weights_digest {recorded}, expert "
                        f"'{m.model}' has {actual}): statistics of another model or another version")
            files.append(sf)
        self.stat_files = files

    def _context(self, job: Job, factors: list[Any] | None, stats: Any) -> TensorContext:
        return TensorContext(
            name=job.name,
            canonical=job.canonical,
            component=job.component,
            num_models=len(self.experts),
            factors=factors,
            stats=stats,
            seed=int(job.kwargs.get("seed") or 0),
            layer=job.layer,
            num_layers=job.num_layers,
            log=self.notes,
            statistics=self._job_statistics(job),
        )

    def _all_full(self) -> bool:
        """Every expert is a full checkpoint (no adapter)."""
        return all(isinstance(s, FullSource) for s in self.experts)

    def _streamable(self) -> bool:
        """Tensors can be streamed from the memory-mapped inputs: CPU math, every expert a full checkpoint."""
        return self.device.type == "cpu" and self._all_full()

    def _fusable(self) -> bool:
        return self.caps.elementwise and self.strategy == "auto" and self._streamable()

    def _from_weights(self) -> Callable[..., torch.Tensor] | None:
        """The method's form over the experts' weights alone (see methods.base), if it has one and every expert
        is a full checkpoint: merged tensors are then computed without reading the base."""
        fw = self.caps.from_weights
        return fw if fw is not None and self._all_full() else None

    def _check_shape(self, got: torch.Tensor, want: Any, what: str) -> None:
        """The method's result must have the shape of what it merges (``what`` names it in the error)."""
        if tuple(got.shape) != tuple(want):
            raise OmniMergeError(
                f"method '{self.method.name}' returned shape {list(got.shape)} for {what} of shape {list(want)}")

    def _weights(self, job: Job) -> list[torch.Tensor]:
        """The experts' weights of a job in the compute dtype (fresh tensors), each checked for NaN/Inf."""
        out = []
        for src in self.experts:
            assert isinstance(src, FullSource)
            w = src.weight(job.name, job.canonical, self.compute_dtype, self.device)
            if self.check_finite and not _all_finite(w):
                raise NonFiniteTensorError(
                    f"expert '{src.ref}' ({src.path}): tensor '{src.ckpt.find(job.canonical)}' holds NaN or Inf "
                    f"values")
            out.append(w)
        return out

    def _merged_from_weights(self, job: Job, fw: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The merged tensor of a job by the method's ``from_weights`` form, whole, in the compute dtype."""
        out = fw(self._weights(job), self._context(job, None, None), **job.kwargs)
        self._check_shape(out, job.meta.shape, f"tensor '{job.name}'")
        if self.check_finite and not _all_finite(out):
            raise NonFiniteTensorError(
                f"tensor '{job.name}': the {self.method.name} of the experts' values overflows {self.recipe.dtype} "
                f"(the inputs are finite)")
        return out

    def _raw_inputs(self, job: Job, with_base: bool = True) -> tuple[
            torch.Tensor | None, list[torch.Tensor], list[tuple[Checkpoint, str]]] | None:
        """The flat memory-mapped base (None unless ``with_base``) and expert tensors of a job as stored, and
        (checkpoint, name) of each (to release their pages); None if an expert lacks the tensor (the whole-tensor
        path reports it)."""
        assert self.base is not None
        base_raw = self.base.read(job.name).reshape(-1) if with_base else None
        raws = []
        mapped = [(self.base, job.name)] if with_base else []
        for src in self.experts:
            assert isinstance(src, FullSource)
            name = src.ckpt.find(job.canonical)
            if name is None:
                return None
            raws.append(src.ckpt.read(name).reshape(-1))
            mapped.append((src.ckpt, name))
        return base_raw, raws, mapped

    def _blocks(self, n: int, mapped: list[tuple[Checkpoint, str]], compiled: bool, kind: str = "linear") -> Any:
        """(start, end, compiled) over a streamed tensor of n entries: a kernel chunk where ``compiled`` and the
        kernels have loaded, else a torch block (the same bits either way). Unmaps what was read as it goes: the
        resident set stays small (the page cache keeps the bytes)."""
        released = e = 0
        while e < n:
            s = e
            fast = compiled and s % KERNEL_CHUNK == 0 and kernels_ready(kind)
            e = min(n, s + (KERNEL_CHUNK if fast else FUSED_BLOCK))
            yield s, e, fast
            if e - released >= 32 * FUSED_BLOCK or e == n:
                for ck, nm in mapped:
                    ck.release(nm, released, e)
                released = e

    def _torch_block(self, base_raw: torch.Tensor, raws: list[torch.Tensor], s: int,
                     e: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Entries [s, e) as the compute dtype: the base and the task vectors W_i - W0 (each expert converted
        exactly inside the subtraction when the compute dtype holds it: one pass, no converted copy)."""
        cd = self.compute_dtype
        b = base_raw[s:e].to(dtype=cd, copy=True)
        return b, [torch.sub(r[s:e], b) if torch.promote_types(r.dtype, cd) == cd
                   else r[s:e].to(dtype=cd, copy=True).sub_(b) for r in raws]

    @staticmethod
    def _block_out(b: torch.Tensor, delta: torch.Tensor, obuf: torch.Tensor | None, out_dtype: torch.dtype,
                   n: int) -> torch.Tensor:
        """b + delta in the compute dtype, rounded once more to the output dtype on store, as the whole-tensor
        path's ``base.add_(delta).to(out)`` (into ``obuf[:n]`` when the output dtype differs)."""
        if obuf is not None:
            return torch.add(b, delta.to(b.dtype), out=obuf[:n])
        return b.add_(delta.to(b.dtype)).to(out_dtype)

    @contextmanager
    def _one_thread_per_worker(self) -> Any:
        """Worker threads are the parallelism: one intra-op thread each (OpenMP's count is per thread)."""
        threads = torch.get_num_threads()
        if self.workers > 1 and threading.current_thread() is not threading.main_thread():
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _merge_job_fused(self, job: Job, writer: Sink) -> bool:
        """Elementwise methods from full checkpoints: stream the tensor in cache-sized blocks (read from the
        page cache, convert, subtract, merge, add, convert, write each block) instead of making full-size
        float32 copies. Every element goes through exactly the operations of the whole-tensor path, so the
        output is bit-identical. Returns False, having written nothing final, when a block holds a non-finite
        value: the whole-tensor path then runs and reports it exactly as before."""
        fw = self._from_weights()
        inputs = self._raw_inputs(job, with_base=fw is None)
        if inputs is None:
            return False
        base_raw, raws, mapped = inputs
        ctx = self._context(job, None, None)
        n, cd = raws[0].numel(), self.compute_dtype
        linear = self.caps.linear
        form = linear(job.kwargs) if linear is not None and self.use_kernels else None
        kernel = None
        dtypes = [r.dtype for r in raws] + ([base_raw.dtype] if base_raw is not None else [])
        if form is not None and LinearBlocks.supports(dtypes, job.out_dtype, cd):
            kernel = LinearBlocks(job.out_dtype, min(n, KERNEL_CHUNK), *form, direct=fw is not None)
        obuf = torch.empty(min(n, FUSED_BLOCK), dtype=job.out_dtype) if job.out_dtype != cd else None
        with self._one_thread_per_worker():
            for s, e, fast in self._blocks(n, mapped, kernel is not None):
                if fast:  # one compiled call per chunk: the same float32 operations, in cache-sized sub-blocks
                    assert kernel is not None
                    merged = kernel(None if base_raw is None else base_raw[s:e], [r[s:e] for r in raws])
                    if merged is None:
                        return False
                    writer.write_part(job.name, merged, s, e == n)
                    continue
                if fw is not None:  # the experts' weights alone
                    try:
                        w = fw([r[s:e].to(dtype=cd, copy=True) for r in raws], ctx, **job.kwargs)
                    except Exception:  # noqa: BLE001 - the whole-tensor path raises it, checks first
                        return False
                    if self.check_finite and not _all_finite(w):
                        return False
                    writer.write_part(job.name, w.to(job.out_dtype) if obuf is None else
                                      obuf[: e - s].copy_(w), s, e == n)
                    continue
                assert base_raw is not None
                b, tvs = self._torch_block(base_raw, raws, s, e)
                ctx.offset = s
                try:
                    delta = self.method.fn(b, tvs, ctx, **job.kwargs)
                except Exception:  # noqa: BLE001 - the whole-tensor path raises it, checks first
                    return False
                del tvs
                # elementwise methods propagate a NaN/Inf of any task vector into the delta: one check
                if self.check_finite and not _all_finite(delta):
                    return False
                self._check_shape(delta, b.shape, f"a block of tensor '{job.name}'")
                writer.write_part(job.name, self._block_out(b, delta, obuf, job.out_dtype, e - s), s, e == n)
        return True

    def _preload_kernels(self, jobs: list[Job]) -> None:
        """Start loading the compiled kernels in the background if streamed jobs will use them."""
        if not self.use_kernels:
            return
        job = next((j for j in jobs if j.streaming), None)
        if job is None:
            return
        linear = self.caps.linear
        ties = self.caps.blockwise is not None and self.caps.compiled == "ties"
        if not ((linear is not None and linear(job.kwargs) is not None) or ties):
            return
        preload_kernels(job.meta.dtype, job.out_dtype, len(self.experts), ties=ties,
                        drop=float(job.kwargs.get("drop_rate") or 0.0) > 0.0,
                        direct=None if ties else self._from_weights() is not None)

    def _blockwise(self, job: Job) -> Any:
        """The method's block-wise implementation if this job can use it, else None."""
        bw = self.caps.blockwise
        if (bw is None or self.strategy != "auto" or job.meta.numel < self.caps.blockwise_min_numel
                or not self._streamable() or not bw.streams(job.kwargs or self.kwargs)):
            return None
        return bw

    def _merge_job_blockwise(self, job: Job, writer: Sink, stats: Any, bw: Any) -> bool:
        """Methods with a ``blockwise`` implementation (TIES, DARE-TIES) from full checkpoints: statistics sweeps
        over cache-sized blocks, a merge sweep that writes each block, then the amended entries (see
        :class:`omnimerge.methods.operators.SparseBlockwise`). Working memory is a few blocks plus what the method keeps
        between sweeps, not T + 3 float32 copies of the tensor. Returns False, having written nothing final, if a
        block holds a non-finite value: the whole-tensor path then runs and reports it."""
        inputs = self._raw_inputs(job)
        if inputs is None:
            return False
        base_raw, raws, mapped = inputs
        n, cd = base_raw.numel(), self.compute_dtype

        def sample(pos: Any) -> list[torch.Tensor]:
            idx = torch.from_numpy(pos)
            b = base_raw[idx].to(dtype=cd)
            return [r[idx].to(dtype=cd).sub_(b) for r in raws]

        ctx = self._context(job, None, stats)
        checked = not self.check_finite
        with self._one_thread_per_worker():
            state = bw.begin(ctx, n, job.kwargs, sample)
            kern = None
            if self.use_kernels and self.caps.compiled == "ties" and TiesBlocks.supports(
                    state, [base_raw.dtype] + [r.dtype for r in raws], job.out_dtype, cd):
                kern = TiesBlocks(state, job.out_dtype, min(n, KERNEL_CHUNK))
            while bw.wants_sweep(state):
                for s, e, fast in self._blocks(n, mapped, kern is not None, "ties_sweep"):
                    if fast:  # compiled: the same operations, one call per chunk
                        assert kern is not None
                        if not kern.sweep(state, s, base_raw[s:e], [r[s:e] for r in raws]):
                            return False
                        continue
                    _b, tvs = self._torch_block(base_raw, raws, s, e)
                    if not checked and not all(_all_finite(t) for t in tvs):
                        return False
                    bw.sweep(state, s, tvs)
                checked = True
                bw.end_sweep(state)
            obuf = torch.empty(min(n, FUSED_BLOCK), dtype=job.out_dtype) if job.out_dtype != cd else None
            for s, e, fast in self._blocks(n, mapped, kern is not None, "ties_merge"):
                if fast:
                    assert kern is not None
                    merged = kern.merge(state, s, base_raw[s:e], [r[s:e] for r in raws])
                    if merged is None:
                        return False
                    writer.write_part(job.name, merged, s, e == n)
                    continue
                b, tvs = self._torch_block(base_raw, raws, s, e)
                if not checked and not all(_all_finite(t) for t in tvs):
                    return False
                delta = bw.merge(state, s, tvs)
                del tvs
                if self.check_finite and not _all_finite(delta):
                    return False
                writer.write_part(job.name, self._block_out(b, delta, obuf, job.out_dtype, e - s), s, e == n)
            fix = bw.fixups(state)
            if fix is not None:
                idx, dvals = fix
                if self.check_finite and not _all_finite(dvals):
                    return False
                order = idx.argsort(kind="stable")
                idx, dvals = idx[order], dvals[torch.from_numpy(order)]
                ti = torch.from_numpy(idx)
                b = base_raw[ti].to(dtype=cd)
                writer.patch(job.name, idx, b.add_(dvals.to(cd)).to(job.out_dtype))
        return True

    def _release(self, job: Job) -> None:
        """Unmap the job's input pages from the process (they stay in the page cache)."""
        assert self.base is not None
        self.base.release(job.name)
        if job.merged:
            for src in self.experts:
                if isinstance(src, FullSource):
                    name = src.ckpt.find(job.canonical)
                    if name is not None:
                        src.ckpt.release(name)

    def _prefetch(self, job: Job) -> None:
        """Start reading the job's inputs ahead (cold page cache: disk reads overlap with compute)."""
        assert self.base is not None
        if not job.merged or isinstance(self._kept, dict):
            return
        if self._from_weights() is None or self.recipe.output != "full":  # (the LoRA output needs W0)
            self.base.prefetch(job.name)
        for src in self.experts:
            if isinstance(src, FullSource):
                name = src.ckpt.find(job.canonical)
                if name is not None:
                    src.ckpt.prefetch(name)

    def strategy_counts(self) -> dict[str, int]:
        """Per strategy, how many merged tensors took it in the last merge (see :meth:`_merge_job`)."""
        with self._counts_lock:
            return dict(sorted(self._counts.items()))

    def _count(self, strategy: str) -> None:
        with self._counts_lock:
            self._counts[strategy] = self._counts.get(strategy, 0) + 1

    def _merge_job(self, job: Job, writer: Sink, stats: Any) -> None:
        """Merge one tensor into the sink by the first strategy that applies (each gives the same bits):
        block-streamed for elementwise methods, from the experts' weights alone, the method's streamed
        implementation, else whole. A streamed attempt that meets a non-finite value falls back to the whole
        tensor, which reports it. A sink that takes whole tensors (e.g. the LoRA adapter output) gets only the
        strategies that write one whole tensor."""
        blocks = not writer.whole_tensors
        if blocks and isinstance(self._kept, dict):
            self._merge_job_kept(job, writer, stats)
            self._count("kept")
            return
        if blocks and job.meta.numel >= FUSED_BLOCK and self._fusable() and self._merge_job_fused(job, writer):
            self._count("fused")
            return
        fw = self._from_weights()
        if fw is not None:
            writer.write(job.name, self._merged_from_weights(job, fw).to(job.out_dtype))
            self._count("from_weights")
            return
        bw = self._blockwise(job) if blocks else None
        if bw is not None and self._merge_job_blockwise(job, writer, stats, bw):
            self._count("blockwise")
            return
        base, delta = self.whole_tensor_delta(job, stats)
        out = base.add_(delta)
        del delta
        writer.write(job.name, out.to(job.out_dtype))
        self._count("whole")

    # -- inputs kept in memory across merges (options.keep_inputs) ----------------------------------------------
    def _decide_keep(self, jobs: list[Job]) -> None:
        """Before the first merge with keep_inputs: keep the merged tensors' inputs if they fit in half the free
        memory of the compute device, else say so and read the checkpoints each time."""
        if self._kept is not None or not self.options.keep_inputs:
            return
        merged = [j for j in jobs if j.merged]
        copies = len(self.experts) + (0 if self._from_weights() is not None else 1)
        need = sum(j.meta.numel for j in merged) * copies * element_size(self.compute_dtype)
        free = _free_memory(self.device)
        if free is not None and need > free // 2:
            self.notes(f"keep_inputs: the merged tensors' inputs need {need / 2**30:.1f} GiB, more than half the "
                       f"free memory of {self.device} ({free / 2**30:.1f} GiB): every merge reads the checkpoints")
            self._kept = False
            return
        self._kept = {}

    def _kept_inputs(self, job: Job) -> tuple[torch.Tensor | None, list[torch.Tensor], list[Any] | None]:
        """The job's inputs in the compute dtype, read once: (base, task vectors, factors), or (None, the
        experts' weights, None) for methods computed from the weights alone. Checked for NaN/Inf when read."""
        assert isinstance(self._kept, dict)
        got = self._kept.get(job.name)
        if got is None:
            got = (None, self._weights(job), None) if self._from_weights() is not None else self._inputs(job)
            with self._counts_lock:
                self._kept[job.name] = got
        return got

    def _merge_job_kept(self, job: Job, writer: Sink, stats: Any) -> None:
        """Merge from the kept inputs: never modified (the method gets fresh copies); an elementwise method runs
        block by block on cache-sized copies, so a merge costs one pass over the kept tensors. The same
        operations per entry as the other strategies: the same bits."""
        base, ins, factors = self._kept_inputs(job)
        fw = self._from_weights()
        n = ins[0].numel()
        blocks = [(0, n)]
        if self.caps.elementwise and self.strategy == "auto" and n >= FUSED_BLOCK:
            blocks = [(s, min(n, s + FUSED_BLOCK)) for s in range(0, n, FUSED_BLOCK)]
        whole = len(blocks) == 1
        flat_in = [t.reshape(-1) for t in ins]
        flat_base = base.reshape(-1) if base is not None else None
        ctx = self._context(job, factors, stats)
        # threads as the strategy this one stands for: the whole-tensor path keeps torch's intra-op threads
        # (results of matmul/SVD depend on their number), the block paths use one per worker
        threads = nullcontext() if whole else self._one_thread_per_worker()
        with threads:
            for s, e in blocks:
                if whole:
                    pieces = [t.clone() for t in ins]
                    b = base.clone() if base is not None else None
                else:
                    pieces = [t[s:e].clone() for t in flat_in]
                    b = flat_base[s:e].clone() if flat_base is not None else None
                ctx.offset = s
                if fw is not None:
                    out = fw(pieces, ctx, **job.kwargs)
                    self._check_shape(out, pieces[0].shape, f"tensor '{job.name}'")
                else:
                    assert b is not None
                    delta = self.method.fn(b, pieces, ctx, **job.kwargs)
                    self._check_shape(delta, b.shape, f"tensor '{job.name}'")
                    out = b.add_(delta.to(b.dtype))
                del pieces
                if self.check_finite and not _all_finite(out):
                    raise NonFiniteTensorError(
                        f"tensor '{job.name}': the {self.method.name} merge overflows {self.recipe.dtype} (the inputs "
                        f"are finite)")
                if whole:
                    writer.write(job.name, out.to(job.out_dtype))
                else:
                    writer.write_part(job.name, out.to(job.out_dtype), s, e == n)

    def whole_tensor_delta(self, job: Job, stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The base tensor and the method's delta for it (in the base's compute dtype), whole."""
        base, tvs, factors = self._inputs(job)
        ctx = self._context(job, factors, stats)
        if self._task_masks is not None:
            self._task_masks.add(job.name, self.caps.task_masks(tvs, ctx, **job.kwargs))
        delta = self.method.fn(base, tvs, ctx, **job.kwargs)
        del tvs
        self._check_shape(delta, base.shape, f"tensor '{job.name}'")
        return base, delta.to(base.dtype)

    def _copy_job(self, job: Job, writer: Sink) -> None:
        assert self.base is not None
        raw = self.base.raw_source(job.name)
        if raw is not None and job.out_dtype == job.meta.dtype:
            writer.copy_raw(job.name, *raw)
        else:
            writer.write(job.name, self.base.read(job.name).to(job.out_dtype))

    def global_stats(self, jobs: list[Job]) -> Any:
        """The method's global pass over the merged tensors (None if it has none or this configuration does not
        need it)."""
        gp = self.method.global_pass
        if gp is None or not gp.needed(self.kwargs):
            return None
        if has_schedule(self.kwargs):
            raise RecipeError(
                f"parameters: a schedule over depth (a list) cannot be used where '{self.method.name}' computes "
                f"statistics over all merged tensors at once (e.g. granularity: global); give single values")
        merged = [j for j in jobs if j.merged]
        state = gp.init(len(self.experts), self.kwargs)
        for p in range(gp.passes):
            for job in self.progress_iter(merged, f"global pass {p + 1}/{gp.passes}"):
                if not gp.reads_tensors:
                    gp.update(p, state, [], self._context(job, None, None))
                    continue
                _base, tvs, factors = self._inputs(job)
                gp.update(p, state, tvs, self._context(job, factors, None))
            gp.finish(p, state)
        return gp.result(state)

    def progress_iter(self, jobs: list[Job], label: str):  # type: ignore[no-untyped-def]
        """``jobs``, with a progress bar labelled ``label`` when progress is on."""
        if not self.progress:
            yield from jobs
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as prog:
            t = prog.add_task(label, total=len(jobs))
            for j in jobs:
                yield j
                prog.advance(t)

    # -- the run ------------------------------------------------------------------------------------------------
    def _prepare(self) -> list[Job]:
        """Open the inputs, plan, validate the experts against the plan; the jobs."""
        self.open()
        assert self.base is not None
        jobs = self.plan()
        if self.vocab is not None:
            self.vocab.account(jobs, len(self.experts) + 1)
        self._preload_kernels(jobs)
        selected = [j.name for j in jobs if j.merged]
        for src in self.experts:
            for note in src.validate(self.base, selected):
                self.notes(note)
        self._open_statistics(jobs)
        return jobs

    def _report(self, jobs: list[Job], seconds: float, shard_files: list[Path]) -> MergeReport:
        return MergeReport(
            output=self.output,
            method=self.method.name,
            parameters=plain(self.kwargs),
            seconds=seconds,
            merged=sum(j.merged for j in jobs),
            copied=sum(not j.merged for j in jobs),
            input_bytes=self._input_bytes(jobs),
            output_bytes=sum(j.meta.numel * element_size(j.out_dtype) for j in jobs),
            shards=[p.name for p in shard_files],
            notes=list(self.notes.seen),
            components=component_counts(jobs),
            strategies=self.strategy_counts(),
        )

    def merge_into(self, sink: Sink | str = "memory", *, model: Any = None, only_merged: bool = False,
                   device: str | torch.device | None = None) -> tuple[MergeReport, Any]:
        """Merge without writing files: into ``sink`` (any :class:`~omnimerge.sinks.Sink`), or ``"memory"``: a new
        state dict (on ``device``, default the compute device), or the tensors of ``model`` (a loaded model, on any
        device). ``only_merged``: skip the tensors copied from the base (a model loaded from the base already holds
        them: repeated merges into it write only what changes). The inputs stay open for the next merge (call
        :meth:`close` when done). Returns the report and the sink (a :class:`StateDictSink`'s ``tensors`` are the
        state dict)."""
        if self.recipe.output != "full":
            raise RecipeError("output: lora merges write a PEFT adapter folder; merge in memory with output: full")
        if self.recipe.task_models:
            raise RecipeError("task_models: the per-task masks are written beside a checkpoint; merge to a folder")
        t0 = time.perf_counter()
        self._counts = {}
        jobs = self._prepare()
        self._decide_keep(jobs)
        if isinstance(self._kept, dict):  # merged from memory: whole-tensor copies unless streamed in blocks
            T, es = len(self.experts), element_size(self.compute_dtype)
            for j in jobs:
                if j.merged:
                    blocked = self.caps.elementwise and self.strategy == "auto" and j.meta.numel >= FUSED_BLOCK
                    j.cost = (T + 3) * (FUSED_BLOCK if blocked else j.meta.numel) * es
                    j.streaming = blocked
        run_jobs = [j for j in jobs if j.merged] if only_merged else jobs
        plan = [(j.name, j.out_dtype, j.meta.shape) for j in run_jobs]
        if isinstance(sink, str):
            if sink != "memory":
                raise RecipeError(f"sink: 'memory' or a Sink object, got {sink!r}")
            assert self.base is not None
            sink = (ModelSink(model, plan, {j.name: j.canonical for j in run_jobs}) if model is not None
                    else StateDictSink(plan, device or self.device))
        try:
            stats = self.global_stats(jobs)
            self.stream(run_jobs, sink, stats)
            sink.finish()
        finally:
            sink.close()
        return self._report(jobs, time.perf_counter() - t0, []), sink

    def run(self) -> MergeReport:
        """Merge into the output folder (a Hugging Face checkpoint, or a PEFT adapter with ``output: lora``),
        atomically: on failure nothing is left at the output path."""
        if self.output is None:
            raise OutputError("no output folder given (merge in memory with merge_into)")
        t0 = time.perf_counter()
        hasher: FileHasher | None = None
        writer: ShardedWriter | None = None
        with AtomicOutput(self.output, self.overwrite, self.notes, resume=self.resume) as output:
            try:
                jobs = self._prepare()
                assert self.base is not None and self.files_src is not None
                inputs = [("base", self.recipe.base_model, self.base.files + self.config_files(self.base.path))]
                inputs += [(f"expert {s.label}", s.ref, s.input_files()) for s in self.experts]
                if self.hash_algorithm:
                    hasher = FileHasher([f for _, _, fs in inputs for f in fs], algorithm=self.hash_algorithm).start()
                stats = self.global_stats(jobs)
                resumable = self.recipe.output == "full" and not self.recipe.task_models
                tmp = output.folder(self.fingerprint(jobs) if resumable else None)
                lora: dict[str, Any] = {}
                resumed = 0
                if self.recipe.output == "lora":
                    lora = self._merge_to_adapter(jobs, tmp, stats)
                    shard_files: list[Path] = []
                else:
                    writer = ShardedWriter(
                        tmp,
                        [(j.name, j.out_dtype, j.meta.shape) for j in jobs],
                        self.shard_bytes,
                        metadata={"omnimerge_method": self.method.name},
                        sync=self.sync,
                        journal=True,
                        reuse=output.reused,
                    )
                    todo = jobs
                    if output.reused:
                        resumed = len(writer.resumed)
                        todo = [j for j in jobs if j.name not in writer.resumed]
                        self.notes(f"resuming an unfinished earlier run: {resumed} of {len(jobs)} tensors it wrote "
                                   f"are verified and kept; writing the other {len(todo)}")
                    if self.recipe.task_models:
                        self._task_masks = TaskMaskWriter(
                            tmp / TASK_DIR, [(j.name, j.meta.shape) for j in jobs if j.merged],
                            [s.label for s in self.experts], self.shard_bytes, sync=self.sync)
                    self.stream(todo, writer, stats, on_done=writer.completed)
                    shard_files = writer.finish()
                    writer = None
                    if self._task_masks is not None:
                        task_index = self._task_masks.finish(
                            method=self.method.name, scaling=float(self.kwargs.get("scaling", 1.0)),
                            base_model=str(self.base.path.resolve()),
                            expert_bytes=sum(j.meta.numel * element_size(j.meta.dtype) for j in jobs)
                            * len(self.experts))
                out_dtype_name = self.recipe.out_dtype if self.recipe.output == "full" else None
                copy_auxiliary(self.base.path, tmp, out_dtype_name)
                if self.files_src != self.base.path:  # e.g. a chat template from an instruct expert
                    copy_auxiliary(self.files_src, tmp, out_dtype_name)
                carries = vocabulary.write_output_files(
                    tmp, self.vocab, self.recipe.chat_template,
                    [(f"base '{self.recipe.base_model}'", self.base.path)]
                    + [(f"model '{s.ref}'", s.path) for s in self.experts], self.notes)
                if self.recipe.output == "lora":  # a config.json would make transformers take the adapter for a model
                    (tmp / "config.json").unlink(missing_ok=True)
                report = self._report(jobs, time.perf_counter() - t0, shard_files)
                report.resumed = resumed
                if self._task_masks is not None:
                    report.task_models = {k: task_index[k] for k in ("tasks", "rescalers", "mask_bytes",
                                                                     "experts_bytes")}
                if lora:
                    report.lora_rank, report.lora_modules = int(lora["lora_rank"]), int(lora["lora_modules"])
                    report.lora_modules_to_save = list(lora["lora_modules_to_save"])
                    report.lora_relative_error = dict(lora["lora_relative_error"])
                    report.lora_module_errors = dict(lora["lora_module_errors"])
                    report.shards, report.output_bytes = list(lora["shards"]), int(lora["output_bytes"])
                digests = hasher.join() if hasher else {}
                card_inputs = [
                    (role, ref, [(Path(f).name, digests.get(str(f), "not hashed")) for f in files])
                    for role, ref, files in inputs
                ]
                write_model_card(tmp, self.recipe.to_yaml(), self.method, card_inputs, report.__dict__,
                                 library="peft" if self.recipe.output == "lora" else "transformers",
                                 differences=self.recipe.differences, carries=carries)
                output.commit()
                report.seconds = time.perf_counter() - t0
                return report
            finally:
                if writer is not None:
                    writer.close()
                if self._task_masks is not None:
                    self._task_masks.close()
                    self._task_masks = None
                if hasher is not None:
                    hasher.cancel()
                self.close()

    def _merge_to_adapter(self, jobs: list[Job], folder: Path, stats: Any) -> dict[str, Any]:
        """``output: lora``: the merged tensors, whole and in the compute dtype, into a
        :class:`~omnimerge.checkpoint.lora.LoraAdapterSink` writing a PEFT adapter into ``folder``; its report
        fields."""
        from omnimerge.checkpoint.lora import LoraAdapterSink

        assert self.base is not None
        merged = [j for j in jobs if j.merged]
        task_types = {s.config.get("task_type") for s in self.experts if s.kind == "adapter"}
        task_types.discard(None)
        sink = LoraAdapterSink(
            folder, self.base, [(j.name, j.canonical, j.component, j.out_dtype, j.meta.shape) for j in merged],
            int(self.recipe.rank),  # type: ignore[arg-type]
            method=self.method.name, base_ref=self.recipe.base_model,
            task_type=task_types.pop() if len(task_types) == 1 else None, notes=self.notes)
        # whole tensors (a factorisation needs the whole delta): the working memory of a whole-tensor merge,
        # plus the delta the sink takes
        per = (len(self.experts) + 4) * element_size(self.compute_dtype)
        whole = [replace(j, out_dtype=self.compute_dtype, streaming=False, cost=per * j.meta.numel) for j in merged]
        try:
            # one tensor at a time: the factorisations (SVD, QR) run on torch's threads, whose results can depend
            # on what else runs beside them; one at a time the adapter is the same bytes for any worker count
            self.stream(whole, sink, stats, workers=1)
            files = sink.finish()
        finally:
            sink.close()
        return {**sink.summary, "shards": [f.name for f in files]}

    def fingerprint(self, jobs: list[Job]) -> dict[str, str]:
        """What determines the output's bytes, digested per part: omnimerge's version, the recipe (as resolved,
        with its folder), the method's parameters, how it runs where that can change bits (device type,
        strategy, kernels), every input file (path, size, modification time) and the output plan. A resumed run
        continues an unfinished one only if all parts agree."""
        import json

        import xxhash

        from omnimerge import __version__

        assert self.base is not None

        def digest(obj: Any) -> str:
            return xxhash.xxh3_128(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

        files = list(self.base.files) + self.config_files(self.base.path)
        for src in self.experts:
            files += src.input_files()
        files += [sf.path for sf in self.stat_files]
        inputs = []
        for f in files:
            st = os.stat(f)
            inputs.append([os.path.realpath(f), st.st_size, st.st_mtime_ns])
        return {
            "omnimerge version": __version__,
            "recipe": digest([self.recipe.to_yaml(), str(self.recipe.base_path)]),
            "parameters": digest(plain(self.kwargs)),
            "device, strategy and kernels": digest([self.device.type, self.strategy, self.use_kernels]),
            "input files": digest(inputs),
            "output plan": digest([[j.name, str(j.out_dtype), list(j.meta.shape), j.merged] for j in jobs]
                                  + [self.shard_bytes]),
        }

    @staticmethod
    def config_files(folder: Path) -> list[Path]:
        """The config files of a model folder that identify it (hashed into the model card)."""
        return [p for p in (folder / "config.json",) if p.is_file()]

    def _input_bytes(self, jobs: list[Job]) -> int:
        """Bytes read: the base's tensors (but merged ones computed from the experts' weights alone), the experts'."""
        direct = self._from_weights() is not None and self.recipe.output == "full"
        total = sum(j.meta.nbytes for j in jobs if not (direct and j.merged))
        for src in self.experts:
            total += sum(f.stat().st_size for f in src.input_files() if f.suffix != ".json")
        return total

    def stream(self, jobs: list[Job], writer: Sink, stats: Any, workers: int | None = None,
               on_done: Callable[[str], None] | None = None) -> None:
        """Run ``jobs`` (merge or copy) into ``writer`` on the worker threads (``workers``, default the merge's)
        under the memory budget; ``on_done(name)`` once a tensor is final (e.g. the writer's journal)."""

        def run_job(job: Job) -> None:
            if job.merged:
                self._merge_job(job, writer, stats)
            else:
                self._copy_job(job, writer)
            self._release(job)
            if on_done is not None:
                on_done(job.name)

        execute(jobs, run_job, workers=workers or self.workers, prefetch=self._prefetch, progress=self.progress)

    def close(self) -> None:
        """Close every input (a later merge opens them again)."""
        for s in self.experts:
            s.close()
        if self.base is not None:
            self.base.close()
        self.experts = []
        self.base = None
        self.stat_files = []


def _free_memory(device: torch.device) -> int | None:
    """Bytes of memory free for new tensors on ``device`` (None if unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
