"""Modality merging: experts of different architectures that share one language model.

The OptMerge paper's second benchmark (§4.5 of the reference; ModelCompose, Chen et al. ACL 2024): a vision
expert, an audio expert and a video expert were fine-tuned from **one** LLM, each with its own encoder and
projector. Merging their language-model deltas gives one LLM that serves every modality.

``mode: modality`` recipes::

    mode: modality
    base_model: qwen2-base            # the shared LLM: a plain causal LM, or one of the experts (its LLM is used)
    models:
      - model: experts/vision         # e.g. a Qwen2-VL checkpoint whose LLM was fine-tuned from the base
      - model: experts/audio          # e.g. a Qwen2-Audio checkpoint on the same LLM
    merge_method: task_arithmetic     # any dense method, or online_composition (adapters kept apart)
    parameters: {scaling: 0.5}

What happens (:func:`merge_modalities`):

1. **Validate** before touching a tensor. The selected tensors (the recipe's ``select``; by default the
   language model's linear weights) must all belong to the base's language model: a selected encoder or
   projector is refused, since it is not shared. Every expert's language model must match the base's:
   equal text-config sizes (``hidden_size``, layers, heads, FFN), every selected tensor present under the same
   canonical name (:mod:`omnimerge.checkpoint.names`: Qwen2-VL ``model.layers.*``, Qwen2-Audio/LLaVA
   ``language_model.model.*`` and a plain LM's ``model.layers.*`` line up) with equal shape, and the expert's
   LLM weights close to the base's (relative distance ``||W - W0|| / ||W0||`` of the first and last selected
   tensors at most :data:`MAX_RELATIVE_DISTANCE`; two unrelated weight matrices are about sqrt(2) apart) —
   an expert fine-tuned from another LLM is refused by name. Experts may have different model types from the
   base and from each other.
2. **Merge once.** The engine (:class:`omnimerge.engine.MergeRun`: its memory budget, worker threads, global
   passes, finiteness checks, per-tensor method call) merges the selected tensors; each merged tensor is
   written straight into every output (a fan-out writer), so it is computed once whatever the number of
   outputs.
3. **One output per expert architecture**, ``OUT/<label>/`` (label = the model type, e.g. ``qwen2_vl``,
   ``qwen2_audio``; ``-2``, ``-3`` added when two different architectures share a model type). It is the
   expert's own checkpoint with the selected shared-LLM tensors replaced by the merged ones; everything else
   (encoder, projector, embeddings, norms, the LLM tensors not selected) is the expert's own, copied byte for
   byte, under the expert's own names and layout, with its config, generation config and processor files.
   Written with the :class:`~omnimerge.checkpoint.writer.ShardedWriter` (shards planned up front).
   **Rule for experts of one architecture** (two vision experts): experts are grouped by (model type,
   architectures, names and shapes of their expert-specific tensors); a group gets one output that carries the
   expert-specific tensors of its **first expert in recipe order**; the manifest says which expert that is and
   lists the others (their LLM deltas are in the merge all the same).
4. ``OUT/manifest.json`` ties the outputs together: method, parameters, base, the shared tensors, each
   output's modalities / architecture / model type / path / source expert, every input file's digest, timing.
   Each output folder also gets the usual model card (README.md) and recipe.

The whole ``OUT`` folder is built in a temporary folder beside it and renamed into place only on success:
a failure leaves nothing at ``OUT``.

**LoRA-adapter experts** (a PEFT adapter folder whose ``base_model_name_or_path`` is the modality model it was
trained on, e.g. a LLaVA with its vision tower, whose LLM is the shared base): the output for such an expert is
a full checkpoint of that modality model with the merged LLM tensors, the adapter's ``modules_to_save`` (its
projector etc.) and the adapter's LoRA deltas on non-selected modules (e.g. a LoRA on the encoder) applied.
The task vectors of the selected tensors come from the LoRA reader (:mod:`omnimerge.checkpoint.lora`).

**Online composition** (``merge_method: online_composition``, :mod:`omnimerge.methods.online`; the paper's
NaiveMC baseline): nothing is merged. Every expert must be a LoRA adapter; ``OUT/adapters/<expert>/`` holds
each expert's LLM LoRA alone (``modules_to_save`` and non-LLM targets moved into that expert's modality
model), ``OUT/<label>/`` each modality model (its own modules_to_save applied, LLM = the base), and the
manifest says to activate all adapters at once (:func:`load_online` does that with peft).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnimerge.checkpoint.files import FileHasher, copy_auxiliary, write_model_card
from omnimerge.checkpoint.reader import (
    Checkpoint,
    TensorMeta,
    is_adapter_dir,
    read_json,
    resolve_model_path,
)
from omnimerge.checkpoint.writer import AtomicOutput, ShardedWriter
from omnimerge.components import classify
from omnimerge.engine import DTYPES, Job, MergeReport, MergeRun
from omnimerge.errors import CheckpointError, OutputError, RecipeError, TensorMismatchError
from omnimerge.methods.base import plain
from omnimerge.options import MergeOptions
from omnimerge.recipe import Recipe

#: Largest accepted relative distance ||W_expert - W0|| / ||W0|| of a selected LLM tensor (first and last one).
MAX_RELATIVE_DISTANCE = 1.0
#: Text-config sizes that must agree between the base's LLM and every expert's LLM.
LLM_CONFIG_KEYS: tuple[str, ...] = (
    "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
)
#: Components that belong to one expert, never to the shared LLM.
EXPERT_SPECIFIC: frozenset[str] = frozenset({"vision_tower", "audio_tower", "video_tower", "projector"})
_MODALITY = {"vision_tower": "vision", "audio_tower": "audio", "video_tower": "video"}
MANIFEST = "manifest.json"


# --- small facts ------------------------------------------------------------------------------------------------
def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a (multimodal) config: ``text_config`` / ``llm_config``, else the config."""
    for key in ("text_config", "llm_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and sub:
            return sub
    return config


def llm_signature(config: dict[str, Any]) -> dict[str, Any]:
    """The LLM sizes of a config (the keys of :data:`LLM_CONFIG_KEYS` that it sets)."""
    tc = text_config(config)
    return {k: tc[k] for k in LLM_CONFIG_KEYS if k in tc}


def modalities_of(names_shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None = None) -> list[str]:
    """Modalities a checkpoint handles, from its towers (vision / audio / video; a vision tower of a model whose
    config has a video token also takes video); ``text`` when it has none."""
    found = {_MODALITY[c] for n, s in names_shapes.items() if (c := classify(n, s)) in _MODALITY}
    if "vision" in found and any(k in (config or {}) for k in ("video_token_id", "video_token_index")):
        found.add("video")
    return sorted(found) or ["text"]


# --- adapters (the LoRA reader does the maths; this adds the modality model they were trained on) --------------
class ModalityAdapter:
    """A PEFT LoRA adapter expert in modality mode: the LoRA reader's
    :class:`~omnimerge.checkpoint.lora.AdapterSource` plus the modality model it was trained on
    (``base_model_name_or_path``: e.g. a LLaVA or Qwen2-VL with its encoder, whose LLM is the shared base)."""

    def __init__(self, path: Path, ref: str, label: str, base_dir: Path | None) -> None:
        from omnimerge.checkpoint.lora import AdapterFiles, AdapterSource

        self.source = AdapterSource(AdapterFiles(path, ref), label)
        self.files = self.source.files
        self.path, self.ref = path, ref
        mods = self.files.modules.values()
        #: canonical names of every tensor the adapter changes (LoRA weights, LoRA biases, saved full tensors)
        self.touched: set[str] = (
            {m.weight_canonical for m in mods} | {m.bias_canonical for m in mods if m.bias is not None}
            | set(self.files.full)
        )
        base_ref = self.files.base_model_name
        if not base_ref:
            raise CheckpointError(
                f"adapter '{ref}': adapter_config.json names no base_model_name_or_path (the modality model it was "
                f"trained on, whose encoder and projector the output needs)"
            )
        for where in (base_dir, path):
            try:
                self.model_path = resolve_model_path(str(base_ref), where)
                break
            except CheckpointError:
                continue
        else:
            raise CheckpointError(
                f"adapter '{ref}': its modality model base_model_name_or_path='{base_ref}' cannot be found "
                f"(a folder, relative to the recipe or the adapter, or a cached hub id)"
            )

    def input_files(self) -> list[Path]:
        return self.source.input_files()

    def apply(self, canonical: str, name: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` (the modality model's tensor) with this adapter's change applied, in float32."""
        w32 = w.to(torch.float32, copy=True)
        tv, _ = self.source.task_vector(name, canonical, w32, torch.float32, torch.device("cpu"))
        return w32 if tv is None else w32.add_(tv)

    def close(self) -> None:
        self.source.close()


# --- the outputs ---------------------------------------------------------------------------------------------------
@dataclass
class _Expert:
    label: str
    ref: str
    kind: str  # "full" | "adapter"
    model: Checkpoint  # the full checkpoint (full experts) or the adapter's modality model
    adapter: ModalityAdapter | None = None
    modalities: list[str] = field(default_factory=list)
    output: str = ""


@dataclass
class _Output:
    label: str
    expert: _Expert  # whose own tensors the output carries
    members: list[str]
    replaced: dict[str, str] = field(default_factory=dict)  # base name -> output name (merged tensors)
    adapted: set[str] = field(default_factory=set)  # output names the expert's adapter changes (not merged)
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)
    writer: ShardedWriter | None = None


class _Fanout:
    """A :class:`~omnimerge.sinks.Sink` that writes each merged tensor into every output under that output's own
    name, each output casting to its own dtype (the engine sends the compute dtype: no double rounding). The
    outputs' writers are finished by the modality merge itself, which also writes what each output carries."""

    whole_tensors = False

    def __init__(self, outputs: list[_Output]) -> None:
        self.outputs = outputs

    def _writers(self) -> list[tuple[ShardedWriter, _Output]]:
        out = []
        for o in self.outputs:
            assert o.writer is not None
            out.append((o.writer, o))
        return out

    def write(self, name: str, tensor: torch.Tensor) -> None:
        for o in self.outputs:
            assert o.writer is not None
            o.writer.write(o.replaced[name], tensor)

    def write_part(self, name: str, part: torch.Tensor, start: int, last: bool) -> None:
        """The engine's block-by-block path (elementwise methods): each output casts to its own dtype."""
        for w, o in self._writers():
            out_name = o.replaced[name]
            w.write_part(out_name, part.to(w.planned[out_name].dtype), start, last)

    def patch(self, name: str, index: Any, values: torch.Tensor) -> None:
        """The streamed TIES path's amended entries (majority sign known only at the end), in every output."""
        for w, o in self._writers():
            out_name = o.replaced[name]
            w.patch(out_name, index, values.to(w.planned[out_name].dtype))

    def copy_raw(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        raise OutputError(f"tensor '{name}': the modality merge writes only merged tensors through the engine "
                          f"(each output carries its other tensors itself)")

    def finish(self) -> list[Path]:
        return []  # each output's writer is finished with what it carries (see _ModalityMerge.run)

    def close(self) -> None:
        return None


@dataclass
class ModalityReport(MergeReport):
    """What a modality merge did: one merge of the shared LLM, one output per expert architecture."""

    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        outs = ", ".join(f"{k} ({'+'.join(v['modalities'])})" for k, v in self.outputs.items())
        what = "kept the adapters apart" if self.method == "online_composition" else (
            f"merged {self.merged} shared LLM tensors once")
        return f"{self.method} (modality): {what}; wrote {outs} in {self.seconds:.2f} s -> {self.output}"


# --- the merge --------------------------------------------------------------------------------------------------------
def merge_modalities(recipe: Recipe, output: str | Path, options: MergeOptions | None = None) -> ModalityReport:
    """Merge the language models of modality experts that share the base's LLM (see the module docstring).

    Writes ``output/<label>/`` (one loadable checkpoint per expert architecture, each with the merged LLM and the
    expert's own encoder/projector) and ``output/manifest.json``; returns a :class:`ModalityReport`. Raises an
    :class:`omnimerge.errors.OmniMergeError` naming the expert and tensor on any mismatch; on failure nothing is
    left at ``output``.
    """
    if recipe.output != "full":
        raise RecipeError("output: only 'full' is supported with mode: modality (one checkpoint per modality)")
    run = MergeRun(recipe, output, options)
    if run.method.output_kind == "online":
        return _OnlineComposition(run).run()
    return _ModalityMerge(run).run()


class _ModalityMerge:
    def __init__(self, run: MergeRun) -> None:
        self.run_ = run
        self.recipe = run.recipe
        self.output = run.output
        self.experts: list[_Expert] = []
        self.outputs: list[_Output] = []
        self.hasher: FileHasher | None = None
        self.inputs: list[tuple[str, str, list[Path]]] = []

    # -- opening --------------------------------------------------------------------------------------------------
    def _open_experts(self) -> None:
        r = self.recipe
        labels: list[str] = []
        for i, m in enumerate(r.models):
            label = m.name or Path(m.model.rstrip("/")).name or f"model{i}"
            if label in labels:
                label = f"{label}#{i}"
            labels.append(label)
            path = resolve_model_path(m.model, r.base_path)
            if is_adapter_dir(path):
                ad = ModalityAdapter(path, m.model, label, r.base_path)
                ex = _Expert(label, m.model, "adapter", Checkpoint(ad.model_path, str(ad.model_path)), ad)
            else:
                ex = _Expert(label, m.model, "full", Checkpoint(path, m.model))
            self.experts.append(ex)

    def _plan(self) -> list[Job]:
        run = self.run_
        jobs = [j for j in run.plan() if j.merged]
        for j in jobs:
            if j.component in EXPERT_SPECIFIC:
                raise RecipeError(
                    f"select: the base's tensor '{j.name}' ({j.component}) is not part of the shared language "
                    f"model; in mode: modality only the language model is merged (each expert keeps its own "
                    f"encoder and projector) — exclude it, e.g. select.exclude: [{j.component}]"
                )
            j.out_dtype = run.compute_dtype  # each output casts to its own dtype: no double rounding
            j.cost = (len(self.recipe.models) + 3) * j.meta.numel * run.compute_dtype.itemsize
        return jobs

    # -- validation -----------------------------------------------------------------------------------------------
    def _validate(self, base: Checkpoint, jobs: list[Job]) -> None:
        sig_b = llm_signature(base.config)
        for ex in self.experts:
            who = f"expert '{ex.label}' ({ex.ref})" + (
                f", modality model '{ex.model.path}'" if ex.kind == "adapter" else "")
            sig_e = llm_signature(ex.model.config)
            for k in LLM_CONFIG_KEYS:
                if k in sig_b and k in sig_e and sig_b[k] != sig_e[k]:
                    raise CheckpointError(
                        f"{who}: its language model has {k}={sig_e[k]}, the base '{self.recipe.base_model}' has "
                        f"{k}={sig_b[k]}: modality experts must share the base's language model"
                    )
            for j in jobs:
                en = ex.model.find(j.canonical)
                if en is None:
                    raise TensorMismatchError(
                        f"{who} has no tensor '{j.canonical}' of the shared language model (the base's "
                        f"'{j.name}', shape {list(j.meta.shape)}): modality experts must share the base's LLM"
                    )
                em = ex.model.tensors[en]
                if em.shape != j.meta.shape:
                    raise TensorMismatchError(
                        f"{who}: tensor '{en}' of the language model has shape {list(em.shape)}, the base's "
                        f"'{j.name}' has {list(j.meta.shape)}: modality experts must share the base's LLM"
                    )
            for j in {id(x): x for x in (jobs[0], jobs[-1])}.values():
                w0 = base.read(j.name).double()
                we = ex.model.read(ex.model.find(j.canonical) or "").double()
                if ex.adapter is not None and j.canonical in ex.adapter.touched:
                    we = ex.adapter.apply(j.canonical, j.name, we).double()
                if not bool(torch.isfinite(we).all()):
                    continue  # reported by the engine's finiteness check, with its own message
                rel = float((we - w0).norm() / w0.norm().clamp_min(1e-12))
                if rel > MAX_RELATIVE_DISTANCE:
                    raise CheckpointError(
                        f"{who}: its language model is not a fine-tune of the base '{self.recipe.base_model}': "
                        f"tensor '{j.canonical}' has ||W - W0|| / ||W0|| = {rel:.3g} (expected at most "
                        f"{MAX_RELATIVE_DISTANCE:g}; unrelated weights are about 1.4 apart)"
                    )
            if ex.adapter is not None:
                self._validate_adapter(ex, jobs)

    def _validate_adapter(self, ex: _Expert, jobs: list[Job]) -> None:
        """The LoRA reader's checks, against the modality model the adapter was trained on."""
        assert ex.adapter is not None
        selected = [n for j in jobs if (n := ex.model.find(j.canonical)) is not None]
        for note in ex.adapter.source.validate(ex.model, selected):
            if "does not select" not in note:  # expected here: the encoder/projector are the expert's own
                self.run_.notes(note)

    # -- grouping and planning the outputs ------------------------------------------------------------------------
    def _group(self, shared: set[str]) -> None:
        groups: dict[Any, _Output] = {}
        used: dict[str, int] = {}
        for ex in self.experts:
            ck = ex.model
            own = frozenset(
                (c, ck.tensors[n].shape) for c, n in ck.canonical.items()
                if c not in shared and classify(n, ck.tensors[n].shape) in EXPERT_SPECIFIC
            )
            key = (ck.model_type, tuple(ck.architectures), own)
            ex.modalities = modalities_of({n: m.shape for n, m in ck.tensors.items()}, ck.config)
            if key in groups:
                groups[key].members.append(ex.label)
                ex.output = groups[key].label
                continue
            stem = re.sub(r"[^\w.\-]", "_", ck.model_type or "model")
            used[stem] = used.get(stem, 0) + 1
            label = stem if used[stem] == 1 else f"{stem}-{used[stem]}"
            groups[key] = _Output(label, ex, [ex.label])
            ex.output = label
        self.outputs = list(groups.values())

    def _plan_output(self, o: _Output, jobs: list[Job], merged: bool) -> None:
        ex, ck = o.expert, o.expert.model
        out_dtype = DTYPES[self.recipe.out_dtype] if self.recipe.out_dtype else None
        by_canon = {j.canonical: j.name for j in jobs}
        if merged:
            o.replaced = {by_canon[c]: n for c, n in ck.canonical.items() if c in by_canon}
        if ex.adapter is not None:
            merged_canon = set(by_canon) if merged else set()
            o.adapted = {n for c in ex.adapter.touched - merged_canon if (n := ck.find(c)) is not None}
        for name, meta in ck.tensors.items():
            dt = meta.dtype
            if merged and name in o.replaced.values():
                dt = out_dtype or meta.dtype
            elif out_dtype is not None and meta.dtype.is_floating_point:
                dt = out_dtype
            o.plan.append((name, dt, meta.shape))

    def _carry(self, o: _Output) -> int:
        """Write the output's own tensors (everything but the merged ones); return how many."""
        assert o.writer is not None
        ck = o.expert.model
        merged_names = set(o.replaced.values())
        n = 0
        for name, dt, _shape in o.plan:
            if name in merged_names:
                continue
            meta: TensorMeta = ck.tensors[name]
            if name in o.adapted:
                assert o.expert.adapter is not None
                o.writer.write(name, o.expert.adapter.apply(ck.canonical_of(name), name, ck.read(name)).to(dt))
            else:
                raw = ck.raw_source(name)
                if raw is not None and dt == meta.dtype:
                    o.writer.copy_raw(name, *raw)
                else:
                    o.writer.write(name, ck.read(name).to(dt))
            n += 1
        return n

    # -- the run --------------------------------------------------------------------------------------------------
    def _start_hashing(self, base: Checkpoint) -> None:
        self.inputs = [("base", self.recipe.base_model, base.files + MergeRun.config_files(base.path))]
        for ex in self.experts:
            files = list(ex.model.files) + MergeRun.config_files(ex.model.path)
            if ex.adapter is not None:
                files = ex.adapter.input_files() + files
            self.inputs.append((f"expert {ex.label}", ex.ref, files))
        if self.run_.hash_algorithm:
            self.hasher = FileHasher([f for _, _, fs in self.inputs for f in fs],
                                     algorithm=self.run_.hash_algorithm).start()

    def _open_base(self) -> Checkpoint:
        from omnimerge.checkpoint.reader import open_checkpoint

        return open_checkpoint(self.recipe.base_model, self.recipe.base_path)

    def run(self) -> ModalityReport:
        run = self.run_
        t0 = time.perf_counter()
        base: Checkpoint | None = None
        with AtomicOutput(self.output, run.overwrite, run.notes) as output:
            try:
                base = self._open_base()
                run.use_inputs(base, [])
                self._open_experts()
                jobs = self._plan()
                self._validate(base, jobs)
                self._open_experts_sources(base)
                if self.recipe.copy_files_from:
                    run.notes("copy_files_from is ignored in mode: modality (each output keeps its expert's files)")
                self._group({j.canonical for j in jobs})
                self._start_hashing(base)
                stats = run.global_stats(jobs)
                tmp = output.folder()
                for o in self.outputs:
                    self._plan_output(o, jobs, merged=True)
                    (tmp / o.label).mkdir()
                    o.writer = ShardedWriter(tmp / o.label, o.plan, run.shard_bytes, sync=run.sync,
                                             metadata={"omnimerge_method": run.method.name, "omnimerge_mode": "modality"})
                carried = {o.label: self._carry(o) for o in self.outputs}
                run.stream(jobs, _Fanout(self.outputs), stats)
                shards: dict[str, list[str]] = {}
                for o in self.outputs:
                    assert o.writer is not None
                    shards[o.label] = [p.name for p in o.writer.finish()]
                    o.writer = None
                report = self._finish(tmp, jobs, carried, shards, t0)
                output.commit()
                report.seconds = time.perf_counter() - t0
                return report
            finally:
                self._cleanup()

    def _cleanup(self) -> None:
        """Close the writers, stop hashing, close inputs (the temporary folder of a failed run goes with the
        AtomicOutput block)."""
        for o in self.outputs:
            if o.writer is not None:
                o.writer.close()
        if self.hasher is not None:
            self.hasher.cancel()
        self._close()

    def _open_experts_sources(self, base: Checkpoint) -> None:
        from omnimerge.checkpoint.sources import FullSource

        sources: list[Any] = []
        for ex in self.experts:
            if ex.kind == "full":
                sources.append(FullSource(ex.model, ex.label))
            else:
                assert ex.adapter is not None
                sources.append(ex.adapter.source)
        self.run_.use_inputs(base, sources)

    def _close(self) -> None:
        self.run_.close()  # closes the base and the engine's sources (FullSource closes its checkpoint)
        for ex in self.experts:
            ex.model.close()
            if ex.adapter is not None:
                ex.adapter.close()

    def _finish(self, tmp: Path, jobs: list[Job], carried: dict[str, int], shards: dict[str, list[str]],
                t0: float) -> ModalityReport:
        run = self.run_
        digests = self.hasher.join() if self.hasher else {}
        self.hasher = None
        outputs: dict[str, dict[str, Any]] = {}
        for o in self.outputs:
            ex = o.expert
            copy_auxiliary(ex.model.path, tmp / o.label, self.recipe.out_dtype)
            outputs[o.label] = {
                "path": o.label,
                "modalities": sorted({m for e in self.experts if e.output == o.label for m in e.modalities}),
                "model_type": ex.model.model_type,
                "architectures": ex.model.architectures,
                "own_tensors_from": ex.label,
                "experts": o.members,
                "merged_tensors": len(o.replaced),
                "carried_tensors": carried[o.label],
                "shards": shards.get(o.label, []),
            }
        seconds = time.perf_counter() - t0
        manifest = self._manifest(jobs, outputs, digests, seconds)
        report = ModalityReport(
            output=self.output, method=run.method.name, parameters=plain(run.kwargs), seconds=seconds,
            merged=len(jobs), copied=sum(carried.values()), strategies=run.strategy_counts(),
            input_bytes=sum(j.meta.nbytes for j in jobs) * (1 + len(self.experts)),
            output_bytes=sum(_plan_bytes(o.plan) for o in self.outputs), notes=list(run.notes.seen),
            outputs=outputs, manifest=manifest,
        )
        for o in self.outputs:
            card_inputs = [
                (role, ref, [(Path(f).name, digests.get(str(f), "not hashed")) for f in files])
                for role, ref, files in self.inputs
            ]
            write_model_card(tmp / o.label, self.recipe.to_yaml(), run.method, card_inputs,
                             {"merged": len(o.replaced), "copied": carried[o.label], "seconds": seconds})
        _write_json(tmp / MANIFEST, manifest)
        return report

    def _manifest(self, jobs: list[Job], outputs: dict[str, dict[str, Any]], digests: dict[str, str],
                  seconds: float) -> dict[str, Any]:
        run = self.run_
        base = run.base
        assert base is not None
        return {
            "omnimerge_manifest": 1,
            "mode": "modality",
            "kind": run.method.output_kind,
            "method": run.method.name,
            "paper": run.method.paper,
            "parameters": _jsonable(plain(run.kwargs)),
            "base": {"model": self.recipe.base_model, "model_type": base.model_type,
                     "llm": llm_signature(base.config)},
            "shared": {"tensors": len(jobs), "select": self.recipe.select.model_dump(),
                       "names": [j.canonical for j in jobs]},
            "outputs": outputs,
            "experts": [
                {"label": e.label, "model": e.ref, "kind": e.kind, "model_type": e.model.model_type,
                 "modalities": e.modalities, "output": e.output,
                 **({"modality_model": str(e.model.path)} if e.kind == "adapter" else {})}
                for e in self.experts
            ],
            "inputs": [
                {"role": role, "model": ref,
                 "files": [{"file": Path(f).name, "digest": digests.get(str(f), "not hashed")} for f in files]}
                for role, ref, files in self.inputs
            ],
            "seconds": round(seconds, 3),
            "recipe": self.recipe.model_dump(exclude={"base_dir"}, exclude_none=True),
        }


# --- online composition (adapters kept apart) -------------------------------------------------------------------
class _OnlineComposition(_ModalityMerge):
    """``merge_method: online_composition``: every expert's LLM LoRA kept apart, to be applied all at once."""

    def run(self) -> ModalityReport:
        run = self.run_
        t0 = time.perf_counter()
        with AtomicOutput(self.output, run.overwrite, run.notes) as output:
            try:
                base = self._open_base()
                run.use_inputs(base, [])
                self._open_experts()
                for ex in self.experts:
                    if ex.adapter is None:
                        raise RecipeError(
                            f"merge_method: online_composition keeps every expert's LoRA adapter apart, but expert "
                            f"'{ex.label}' ({ex.ref}) is a full checkpoint, not a PEFT adapter — use a dense method "
                            f"(e.g. task_arithmetic with scaling 1.0 computes the same sum of deltas)"
                        )
                jobs = self._plan()
                self._validate(base, jobs)
                selected = {j.canonical for j in jobs}
                self._group(selected)
                self._start_hashing(base)
                tmp = output.folder()
                weights = run.kwargs.get("weight") or (1.0,) * len(self.experts)
                adapters: dict[str, dict[str, Any]] = {}
                for ex, w in zip(self.experts, weights, strict=True):
                    adapters[ex.label] = self._write_adapter(ex, float(w), selected, tmp / "adapters" / _safe(ex.label))
                shards: dict[str, list[str]] = {}
                carried: dict[str, int] = {}
                for o in self.outputs:
                    self._plan_output(o, jobs, merged=False)
                    # the LoRA of the selected (shared LLM) modules stays in the adapters, not in the model
                    o.adapted = {n for n in o.adapted if o.expert.model.canonical_of(n) not in selected}
                    (tmp / o.label).mkdir()
                    o.writer = ShardedWriter(tmp / o.label, o.plan, run.shard_bytes, sync=run.sync,
                                             metadata={"omnimerge_method": run.method.name, "omnimerge_mode": "modality"})
                    carried[o.label] = self._carry(o)
                    shards[o.label] = [p.name for p in o.writer.finish()]
                    o.writer = None
                report = self._finish(tmp, [], carried, shards, t0)
                report.merged = 0
                manifest = report.manifest
                manifest["adapters"] = adapters
                manifest["activate"] = list(adapters)
                manifest["shared"].update(tensors=len(selected), names=sorted(selected))
                manifest["usage"] = (
                    "Load the modality model OUT/<label>, then every adapter under OUT/adapters/ (peft "
                    "PeftModel.from_pretrained / load_adapter, one adapter name each) and activate all of them at once "
                    "(model.base_model.set_adapter([...])): the LoRA outputs add up, i.e. W = W0 + sum_i w_i B_i A_i "
                    "scale_i. omnimerge.modality.load_online(OUT, label) does this."
                )
                _write_json(tmp / MANIFEST, manifest)
                output.commit()
                report.seconds = time.perf_counter() - t0
                return report
            finally:
                self._cleanup()

    def _write_adapter(self, ex: _Expert, weight: float, selected: set[str], folder: Path) -> dict[str, Any]:
        """The expert's LoRA on the shared LLM alone (``lora_B`` scaled by its weight), as a PEFT adapter."""
        from safetensors.torch import save_file

        assert ex.adapter is not None
        files = ex.adapter.files
        mods = sorted((m for m in files.modules.values() if m.weight_canonical in selected), key=lambda m: m.name)
        if not mods:
            raise CheckpointError(
                f"expert '{ex.label}' ({ex.ref}): its adapter has no LoRA on the selected language-model tensors "
                f"(it targets: {', '.join(sorted(files.modules)[:3]) or 'nothing'})"
            )
        if weight != 1.0 and any(m.magnitude is not None for m in mods):
            raise RecipeError(
                f"models: expert '{ex.label}' is a DoRA adapter: its weight must be 1.0 in online_composition "
                f"(a DoRA change does not scale linearly), got {weight:g}"
            )
        sd: dict[str, torch.Tensor] = {}
        for m in mods:
            for key in (m.A, m.B, m.magnitude, m.bias):
                if key is None:
                    continue
                t = files.tensor(key)
                if key in (m.B, m.bias) and weight != 1.0:
                    t = (t.float() * weight).to(t.dtype)
                sd[key] = t.contiguous()
        cfg = dict(files.config)
        cfg["target_modules"] = [m.name for m in mods]
        cfg["modules_to_save"] = None
        cfg["base_model_name_or_path"] = None
        folder.mkdir(parents=True)
        save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(folder / "adapter_config.json", cfg)
        return {"path": f"adapters/{folder.name}", "modules": len(mods), "weight": weight, "expert": ex.label,
                "output": ex.output}


def load_online(path: str | Path, label: str, model_class: Any = None) -> Any:
    """Load an online composition: the modality model ``path/<label>`` with every adapter of ``path/adapters``
    active at once (a peft ``PeftModel``). ``model_class`` defaults to ``AutoModelForImageTextToText``-style
    resolution from the config's ``architectures``."""
    import transformers
    from peft import PeftModel

    root = Path(path)
    manifest = read_json(root / MANIFEST)
    if manifest.get("kind") != "online":
        raise CheckpointError(f"{root}: not an online composition (manifest kind {manifest.get('kind')!r})")
    model_dir = root / manifest["outputs"][label]["path"]
    if model_class is None:
        arch = manifest["outputs"][label]["architectures"][0]
        model_class = getattr(transformers, arch)
    model = model_class.from_pretrained(model_dir, trust_remote_code=False)
    names = manifest["activate"]
    peft_model = PeftModel.from_pretrained(model, root / manifest["adapters"][names[0]]["path"], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(root / manifest["adapters"][n]["path"], adapter_name=n)
    peft_model.base_model.set_adapter(names)
    peft_model.eval()
    return peft_model


# --- helpers --------------------------------------------------------------------------------------------------------
def _safe(label: str) -> str:
    return re.sub(r"[^\w.\-]", "_", label)


def _plan_bytes(plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    total = 0
    for _n, dt, shape in plan:
        k = torch.empty((), dtype=dt).element_size()
        for s in shape:
            k *= s
        total += k
    return total


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | int | str | bool) or x is None:
        return x
    return str(x)


def _write_json(path: Path, obj: Any) -> None:
    try:
        path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
