"""Trials merge in memory, into one loaded model: no checkpoint is written per trial.

:class:`TrialMerger` writes the merge of one point of the search space into the model's tensors:

* **task arithmetic** with full-checkpoint experts (the searched coefficients being ``scaling`` and the
  per-expert / per-layer-group ``weight``): the experts' task vectors tau_t = W_t - W0 are computed once, in the
  recipe's compute dtype, and every trial forms W0 + lambda sum_t w_{g,t} tau_t with the same torch operations
  the engine's ``task_arithmetic`` uses (one pass over the cached tensors): the result is bit-identical to
  ``omnimerge merge`` of the recipe with those coefficients (``best.yaml``), which the tests check;
* **every other method** (and LoRA-adapter experts): the engine merges in memory through an
  :class:`omnimerge.Merger`, which keeps the checkpoints open across trials, straight into the model
  (``only_merged``). Its coefficient-independent work is not cached across trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omnimerge.api import Merger
from omnimerge.checkpoint.names import canonical_name
from omnimerge.components import classify
from omnimerge.methods.base import Steps
from omnimerge.methods.linear import weighted_sum
from omnimerge.plan import DTYPES, layer_of
from omnimerge.search.spec import SearchPlan


def _read_folder(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    if (path / "adapter_config.json").exists():
        return None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


class TrialMerger:
    """Merges points of ``plan``'s space into ``model`` (a model loaded from the base)."""

    def __init__(self, plan: SearchPlan, model: Any) -> None:
        self.plan = plan
        self.model = model
        self.merger = Merger(plan.recipe, progress=False, hash_inputs=False)
        self.path = "engine"
        self._cache: dict[str, Any] | None = None
        try:
            self._prepare()
        except BaseException:
            self.merger.close()
            raise

    def _prepare(self) -> None:
        r = self.plan.recipe
        if r.merge_method != "task_arithmetic" or r.modifiers or r.output != "full" or \
                any(d.kind == "param" for d in self.plan.dims):
            return
        ref = self.merger.state_dict(device="cpu", only_merged=True)  # the merged tensors and their dtypes
        sd = self.model.state_dict()
        by_canonical = {canonical_name(k): v for k, v in sd.items()}  # checkpoint and model layouts may differ
        msd = {k: by_canonical.get(canonical_name(k)) for k in ref}
        if any(v is None or v.shape != ref[k].shape for k, v in msd.items()):
            return
        base_dir = Path(self.merger.recipe.base_model)
        if r.base_path is not None and not base_dir.is_absolute():
            base_dir = r.base_path / base_dir
        base = _read_folder(base_dir)
        experts = []
        for m in r.models:
            p = Path(m.model)
            experts.append(_read_folder(p if p.is_absolute() or r.base_path is None else r.base_path / p))
        if base is None or any(e is None or any(k not in e for k in ref) for e in experts):
            return
        cd = DTYPES[r.dtype]
        depth: dict[str, int] = {}
        decoder: set[str] = set()
        for name, t in base.items():
            where = layer_of(canonical_name(name))
            if where is not None:
                depth[where[0]] = max(depth.get(where[0], 0), where[1] + 1)
                if classify(name, tuple(t.shape)) == "language_model":
                    decoder.add(where[0])
        tensors = {}
        for name, out in ref.items():
            w0 = base[name].to(cd)
            where = layer_of(canonical_name(name))
            in_dec = where is not None and where[0] in decoder
            tensors[name] = {
                "w0": w0,
                "tvs": [e[name].to(cd) - w0 for e in experts],  # type: ignore[index]
                "layer": where[1] if in_dec else None,  # type: ignore[index]
                "num_layers": depth[where[0]] if in_dec else 0,  # type: ignore[index]
                "dtype": out.dtype,
            }
        self._cache = {"tensors": tensors, "params": msd}
        self.path = "cached task vectors"

    def _resolved(self, params: dict[str, float]) -> dict[str, Any]:
        top, per = self.plan.fixed_parameters(params)
        m = self.merger.recipe
        from omnimerge.methods import get_method

        return get_method(m.merge_method).resolve(top, per)

    def _fast(self, params: dict[str, float]) -> dict[str, torch.Tensor]:
        assert self._cache is not None
        kw = self._resolved(params)
        scaling, weight = float(kw["scaling"]), kw["weight"]
        out = {}
        for name, c in self._cache["tensors"].items():
            w = tuple(x.at(c["layer"], c["num_layers"]) if isinstance(x, Steps) else float(x) for x in weight)
            acc = weighted_sum(c["tvs"], w, inplace=False)
            if scaling != 1.0:
                acc.mul_(scaling)
            out[name] = c["w0"].clone().add_(acc).to(c["dtype"])
        return out

    def state(self, params: dict[str, float]) -> dict[str, torch.Tensor]:
        """The merged tensors (base checkpoint names) at ``params``, as :meth:`apply` writes them."""
        if self._cache is not None:
            return self._fast(params)
        top, per = self.plan.fixed_parameters(params)
        return self.merger.state_dict(top, per, device="cpu", only_merged=True)

    def apply(self, params: dict[str, float]) -> None:
        """Write the merge at ``params`` into the model."""
        if self._cache is None:
            top, per = self.plan.fixed_parameters(params)
            self.merger.into(self.model, top, per, only_merged=True)
            return
        msd = self._cache["params"]
        with torch.no_grad():
            for name, t in self._fast(params).items():
                msd[name].copy_(t)

    def close(self) -> None:
        self.merger.close()

    def __enter__(self) -> TrialMerger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
