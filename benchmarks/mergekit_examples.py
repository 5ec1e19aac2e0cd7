"""mergekit's example recipes through omnimerge: the outcome of each, and its distance to mergekit's output.

    python benchmarks/mergekit_examples.py            # against the stored mergekit outputs (tests/fixtures)

The recipes are ``tests/fixtures/mergekit/examples/*.yml`` (mergekit's ``examples/`` folder), their model names
replaced by the tiny 40-layer Llamas of ``tests/mergekit_inputs.py``; mergekit 0.1.5's outputs on the same inputs
were stored by ``tools/mergekit_fixtures.py`` (run with mergekit's interpreter). Prints a Markdown table: the
example, what omnimerge did (ran unchanged / ran with stated differences / refused, with the reason), and per
example the largest |omnimerge - mergekit| over all tensors, relative to each tensor's largest magnitude, in
float16 ulps at that scale (2^-10), and the number of tensors that differ at all.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import omnimerge  # noqa: E402
from omnimerge.errors import OmniMergeError  # noqa: E402
from omnimerge.mergekit_format import translate  # noqa: E402
from tests.mergekit_inputs import build_examples, localise  # noqa: E402

FIX = REPO / "tests" / "fixtures" / "mergekit" / "examples"


def main() -> None:
    rows = ["| example | outcome | stated differences | max diff vs mergekit (f16 ulps at tensor scale) | "
            "tensors differing |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_examples(root / "in")
        for f in sorted(FIX.glob("*.yml")):
            mk = localise(yaml.safe_load(f.read_text()), root / "in")
            try:
                recipe, diffs = translate(mk)
                omnimerge.merge(recipe, root / f.stem, hash_inputs=False)
            except OmniMergeError as e:
                rows.append(f"| {f.stem} | refused: {str(e).split(': ', 1)[-1]} | | | |")
                continue
            got = load_file(str(root / f.stem / "model.safetensors"))
            want = load_file(str(FIX / f.stem / "model.safetensors"))
            worst, n = 0.0, 0
            for k, w in want.items():
                d = (got[k].float() - w.float()).abs().max().item()
                worst = max(worst, d / max(w.float().abs().max().item(), 1e-30) * 1024)
                n += not torch.equal(got[k].to(w.dtype), w)
            outcome = "ran with stated differences" if diffs else "ran unchanged"
            said = "; ".join(d.split(":")[0] for d in diffs) or "none"
            rows.append(f"| {f.stem} | {outcome} | {said} | {worst:.3g} | {n} of {len(want)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
