"""Compare two merged checkpoints tensor by tensor (bf16 outputs; differences measured in bf16 ulps)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def _index(folder: Path) -> dict[str, Path]:
    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = f
    return out


class _Reader:
    def __init__(self, folder: Path) -> None:
        self.where = _index(folder)
        self.handles: dict[Path, object] = {}

    def close(self) -> None:
        self.handles.clear()

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if f not in self.handles:
            self.handles[f] = safe_open(str(f), "pt")
        return self.handles[f].get_tensor(name)  # type: ignore[attr-defined]


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16 ulp at |x| (float32 tensor)."""
    ax = x.abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def compare_exact(a_dir: Path, b_dir: Path, base_dir: Path | None = None) -> dict:
    """Deterministic methods: fraction of elements bit-equal, within 1 ulp, max difference in ulps, and (with
    the base) the difference relative to the merged delta, ||a - b|| / ||a - W0||, over all tensors."""
    a, b = _Reader(a_dir), _Reader(b_dir)
    w0 = _Reader(base_dir) if base_dir is not None else None
    dd = ad = 0.0
    names = [n for n in a.where if n in b.where]
    n_el = n_eq = n_1ulp = 0
    max_ulps = 0.0
    worst = ""
    for name in names:
        x, y = a.get(name).float().flatten(), b.get(name).float().flatten()
        d = (x - y).abs()
        u = d / _ulp(torch.maximum(x.abs(), y.abs()))
        n_el += x.numel()
        n_eq += int((d == 0).sum())
        n_1ulp += int((u <= 1.0).sum())
        m = float(u.max()) if u.numel() else 0.0
        dd += float(((x - y) ** 2).sum())
        if w0 is not None and name in w0.where:
            ad += float(((x - w0.get(name).float().flatten()) ** 2).sum())
        if m > max_ulps:
            max_ulps, worst = m, name
    out = {
        "tensors_compared": len(names),
        "only_in_a": sorted(set(a.where) - set(b.where))[:5],
        "only_in_b": sorted(set(b.where) - set(a.where))[:5],
        "equal_frac": n_eq / max(n_el, 1),
        "within_1ulp_frac": n_1ulp / max(n_el, 1),
        "max_ulps": max_ulps,
        "worst_tensor": worst,
        "rel_diff_vs_delta": (dd / ad) ** 0.5 if ad > 0 else None,
    }
    a.close()
    b.close()
    if w0 is not None:
        w0.close()
    return out


def delta_stats(out_dir: Path, base_dir: Path) -> dict:
    """For randomised methods (DARE): fraction of entries changed from the base, relative delta norm."""
    o, b = _Reader(out_dir), _Reader(base_dir)
    n_el = n_changed = 0
    dn = bn = 0.0
    for name in o.where:
        if name not in b.where:
            continue
        x, y = o.get(name).float(), b.get(name).float()
        d = x - y
        n_el += x.numel()
        n_changed += int((d != 0).sum())
        dn += float((d * d).sum())
        bn += float((y * y).sum())
    o.close()
    b.close()
    return {"changed_frac": n_changed / max(n_el, 1), "rel_delta_norm": (dn / max(bn, 1e-30)) ** 0.5}
