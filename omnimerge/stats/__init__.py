"""``omnimerge stats``: per-expert statistics for the data-aware methods, collected from calibration data.

- **Input Grams** (``regmean_gram``, what ``regmean`` reads): forward pre-hooks on every ``nn.Linear`` of the
  expert (or those matching ``include``) record the layer's input rows X, with the padding rows dropped (the
  attention mask, for inputs laid out as the token sequence (batch, length, in); other inputs, e.g. a vision
  tower's patch rows, have no padding and count whole). One accumulator per **input site**: modules that get
  the same input tensor in a forward (q/k/v, gate/up) share it, computed once. XᵀX is accumulated in float64
  with the token count N; the file stores G = XᵀX / N (the golden convention, FusionBench's per-token mean) as
  float32 under each weight's checkpoint name, the site map and per-site token counts in the manifest.
- **Diagonal Fisher** (``fisher_diagonal``, what ``fisher`` reads): per example (batch of one: the squared
  gradient of each example, not of a batch mean), the squared gradient of Σ_k log p(y_k | x, y_<k) over the
  answer tokens (every non-padding position where the data has no answers), accumulated in float64 and divided
  by the number of examples. ``fisher="true"`` (default) draws y_k from the model's own next-token distribution
  at each position (teacher-forced on the data, one sample per position); ``"empirical"`` uses the data's labels.

The collection runs one full forward per batch with the whole expert in memory (see ``memory_bound``); the
layer-streamed collection of ``evaluation-search-data.md`` §3.8 is not implemented.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnimerge.errors import OmniMergeError

__all__ = ["Batch", "GramCollector", "StatsResult", "collect_fisher", "collect_grams", "save_statistics"]


@dataclass
class Batch:
    """Model inputs of a calibration batch (``input_ids``, ``attention_mask``, ``pixel_values``, ...) and, where
    the data has answers, ``labels`` (-100 outside the answer tokens)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None


@dataclass
class StatsResult:
    """Collected statistics: ``tensors`` keyed by the model's weight names, and what the manifest records."""

    kind: str
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)


def _linears(model: torch.nn.Module, include: str | None, exclude: str | None) -> dict[str, torch.nn.Linear]:
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = f"{name}.weight"
        if (inc is not None and not inc.search(w)) or (exc is not None and exc.search(w)):
            continue
        out[name] = mod
    return out


class GramCollector:
    """Forward pre-hooks that accumulate, per input site, Σ xᵀx (float64) and the number of rows, padding rows
    excluded (see the module docstring). Use as a context manager around the forwards; set :attr:`mask` to the
    batch's attention mask before each forward."""

    def __init__(self, model: torch.nn.Module, include: str | None = None, exclude: str | None = None) -> None:
        self.modules = _linears(model, include, exclude)
        if not self.modules:
            raise OmniMergeError(f"stats: no nn.Linear layer of the model matches include={include!r} "
                                 f"exclude={exclude!r}")
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}  # site -> Σ xᵀx
        self.counts: dict[str, int] = {}
        self.site_of: dict[str, str] = {}  # module -> site (its first module's name)
        self._last: tuple[torch.Tensor, str] | None = None  # the last module's input and its site
        self._handles: list[Any] = []

    def __enter__(self) -> GramCollector:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._last = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m.to(torch.bool)]
        return x.reshape(-1, x.shape[-1])

    def _hook(self, name: str) -> Any:
        def hook(mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:  # the input of the module just before: one site
                self.site_of.setdefault(name, self._last[1])
                return
            site = self.site_of.setdefault(name, name)
            self._last = (x, site)  # only the last input is held (q/k/v, gate/up are called one after another)
            rows = self._rows(x.detach()).to(torch.float64)
            acc = self.sums.get(site)
            if acc is None:
                acc = self.sums[site] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                                    device=rows.device)
            acc.addmm_(rows.T, rows)
            self.counts[site] = self.counts.get(site, 0) + int(rows.shape[0])

        return hook

    def result(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], dict[str, int]]:
        """G = Σ xᵀx / N per weight (float32, on the CPU), the sites (site -> weights) and tokens per site."""
        grams: dict[str, torch.Tensor] = {}
        sites: dict[str, list[str]] = {}
        for mod, site in self.site_of.items():
            n = self.counts[site]
            if n == 0:
                raise OmniMergeError(f"stats: layer '{mod}' saw no (unpadded) input token in the calibration data")
            grams[f"{mod}.weight"] = (self.sums[site] / n).float().cpu()
            sites.setdefault(f"{site}.in", []).append(f"{mod}.weight")
        return grams, sites, {f"{s}.in": n for s, n in self.counts.items()}


def _to(batch: Batch, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.inputs.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def collect_grams(model: torch.nn.Module, batches: Iterable[Batch], *, include: str | None = None,
                  exclude: str | None = None, progress: Any = None) -> StatsResult:
    """Input Grams of the model's linear layers over ``batches`` (see the module docstring)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    t0, n_batches = time.perf_counter(), 0
    with torch.no_grad(), GramCollector(model, include, exclude) as col:
        for b in batches:
            ins = _to(b, device, dtype)
            col.new_batch(ins.get("attention_mask"))
            model(**ins)
            col.new_batch(None)
            n_batches += 1
            if progress is not None:
                progress()
    grams, sites, counts = col.result()
    return StatsResult("regmean_gram", grams, {"sites": sites, "tokens": counts, "batches": n_batches,
                                               "seconds": round(time.perf_counter() - t0, 3),
                                               "gram": "G = X^T X / N (float64 sums, padding rows excluded)"})


def collect_fisher(model: torch.nn.Module, examples: Iterable[Batch], *, mode: str = "true", seed: int = 0,
                   include: str | None = None, exclude: str | None = None, progress: Any = None) -> StatsResult:
    """The diagonal Fisher of the model's parameters over ``examples`` (batches of one; see the module
    docstring): ``mode`` 'true' (labels drawn from the model) or 'empirical' (the data's labels)."""
    if mode not in ("true", "empirical"):
        raise OmniMergeError(f"stats: --fisher must be 'true' or 'empirical', got {mode!r}")
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    params = {n: p for n, p in model.named_parameters()
              if p.is_floating_point() and (inc is None or inc.search(n)) and not (exc is not None and exc.search(n))}
    if not params:
        raise OmniMergeError(f"stats: no parameter of the model matches include={include!r} exclude={exclude!r}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    t0, n, tokens = time.perf_counter(), 0, 0
    for b in examples:
        ins = _to(b, device, dtype)
        if ins["input_ids"].shape[0] != 1:
            raise OmniMergeError("stats: the Fisher is collected one example at a time (batch size 1)")
        mask = ins.get("attention_mask", torch.ones_like(ins["input_ids"])).bool()
        labels = b.labels.to(device) if b.labels is not None else None
        if labels is None:
            if mode == "empirical":
                raise OmniMergeError("stats: the empirical Fisher needs answers in the calibration data "
                                     "(or use --fisher true)")
            labels = torch.where(mask, ins["input_ids"], torch.full_like(ins["input_ids"], -100))
        logits = model(**ins).logits[:, :-1].float()
        target = labels[:, 1:]
        pos = target != -100
        if not bool(pos.any()):
            continue
        logp = torch.log_softmax(logits[pos], dim=-1)
        if mode == "true":
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(1)
        else:
            y = target[pos]
        loss = -logp.gather(1, y[:, None]).sum()
        model.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                acc[name].add_(p.grad.detach().to(torch.float64).square())
        n += 1
        tokens += int(pos.sum())
        if progress is not None:
            progress()
    model.zero_grad(set_to_none=True)
    if n == 0:
        raise OmniMergeError("stats: no calibration example had a token to take the Fisher on")
    fisher = {name: (a / n).float().cpu() for name, a in acc.items()}
    return StatsResult("fisher_diagonal", fisher, {"examples": n, "tokens": tokens, "fisher": mode, "seed": seed,
                                                   "seconds": round(time.perf_counter() - t0, 3)})


def save_statistics(result: StatsResult, out: str | Path, model_path: Path, *, manifest: Mapping[str, Any]) -> Path:
    """Write ``result`` as the golden convention's safetensors (weights renamed to the expert checkpoint's own
    tensor names) with ``statistic``, ``weights_digest`` and ``manifest`` metadata, atomically (a temporary
    file renamed into place)."""
    import transformers
    from safetensors.torch import save_file

    import omnimerge
    from omnimerge.checkpoint.names import canonical_name
    from omnimerge.checkpoint.reader import open_checkpoint
    from omnimerge.checkpoint.statistics import weights_digest

    ck = open_checkpoint(str(model_path))
    try:
        files = list(ck.files)
        rename = {}
        for k in result.tensors:
            on_disk = ck.find(canonical_name(k))
            if on_disk is None:
                raise OmniMergeError(f"stats: the model's weight '{k}' is not a tensor of {model_path} (its "
                                     f"checkpoint names differ from the loaded model's)")
            rename[k] = on_disk
    finally:
        ck.close()
    tensors = {rename[k]: v.contiguous().clone() for k, v in result.tensors.items()}
    info = dict(result.manifest)
    if "sites" in info:
        info["sites"] = {s: [rename[w] for w in ws] for s, ws in info["sites"].items()}
    digest = weights_digest(files)
    meta = {"statistic": result.kind, "weights_digest": digest,
            "manifest": json.dumps({**dict(manifest), **info, "model": str(model_path), "weights_digest": digest,
                                    "dtype": "float32", "omnimerge": omnimerge.__version__,
                                    "transformers": transformers.__version__, "torch": torch.__version__},
                                   sort_keys=True)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

