"""The bench's AdaMerging rows (opt-in: ``omnimerge bench --adamerging task,layer``).

AdaMerging's protocol (Yang et al., ICLR 2024) is test-time adaptation: the coefficients are learned on the
**test split's inputs, without their labels**, and the same test split is then scored. The bench follows it:
the adaptation inputs are the prompts (image + question, no answer) of the first :data:`N_ADAPT` test examples
of every task (the first ones the test score is computed on), encoded as evaluation encodes them
(:func:`omnimerge.bench.calibration.bench_prompt_batches`); no label is read. The experts are the family's
merge inputs (the full checkpoints; the LoRA adapters themselves for the LoRA family), the base model is the
zoo's. The learned coefficients are written as a task-arithmetic recipe and merged through ``omnimerge.merge``
like every other row; there is no lambda grid (the coefficients are the result), the validation score is
reported for reference only.

Settings (fixed a priori, not tuned on any score): the paper's init 0.3, clamp to [0, 1], Adam; 100 steps at lr
1e-2 (the paper: 500 at 1e-3; a tenth of the steps and ten times the rate to fit a 2-core CPU), one batch of 16
prompts per task per step, entropy of the first answer token's distribution, seed = the zoo's seed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omnimerge.bench import TASKS

N_ADAPT, BATCH, STEPS, LR, INIT = 64, 16, 100, 1e-2, 0.3
#: ``--quick`` (the CI-size bench): a few steps on a few prompts, to check the row runs
N_ADAPT_QUICK, STEPS_QUICK = 16, 3
GRANULARITIES = ("task", "layer")
ROW_NAMES = {"task": "AdaMerging (task-wise)", "layer": "AdaMerging (layer-wise)"}


def parse_granularities(value: str) -> list[str]:
    """``task,layer`` -> the granularities, checked (ValueError naming the bad one)."""
    out = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in out if v not in GRANULARITIES]
    if bad:
        raise ValueError(f"--adamerging: expected task and/or layer (comma-separated), got {bad[0]!r}")
    return list(dict.fromkeys(out))


def adamerging_row(granularity: str, base_dir: Path, inputs: list[Path], base_model: Any, seed: int,
                   scratch: Path, quick: bool = False) -> tuple[dict[str, Any], Any]:
    """Learn the coefficients, merge them with ``omnimerge.merge``; returns (the row's extra fields, the merged
    model loaded). ``base_model``: the zoo's base, loaded (used functionally, left unchanged)."""
    import shutil

    from omnimerge.adamerging import FunctionalMerge, adamerge
    from omnimerge.api import as_recipe
    from omnimerge.bench.calibration import bench_prompt_batches
    from omnimerge.bench.merging import make_recipe, merge_to_dir
    from omnimerge.bench.model import load_model

    n, steps = (N_ADAPT_QUICK, STEPS_QUICK) if quick else (N_ADAPT, STEPS)
    t0 = time.perf_counter()
    recipe = as_recipe(make_recipe("task_arithmetic", base_dir, inputs, {"scaling": 1.0}))
    data = bench_prompt_batches(TASKS, "test", n, BATCH, seed)
    grads = {n: p.requires_grad for n, p in base_model.named_parameters()}
    try:
        fm = FunctionalMerge(recipe, base_model, granularity)
        res = adamerge(recipe, base_model, data, steps=steps, lr=LR, granularity=granularity, init=INIT, seed=seed,
                       functional=fm)
    finally:
        for n, p in base_model.named_parameters():
            p.requires_grad_(grads[n])
    learn_s = time.perf_counter() - t0
    mdir = scratch / f"adamerging-{granularity}"
    merge_to_dir(res.recipe, mdir)
    merged = load_model(mdir)
    shutil.rmtree(mdir, ignore_errors=True)
    before, after = res.info["entropy_first_batches"]
    extra = {"adamerging": {"granularity": granularity, "coefficients": res.coefficients.tolist(),
                            "groups": res.groups, "entropy_before": before, "entropy_after": after,
                            "steps": steps, "lr": LR, "init": INIT, "batch": BATCH,
                            "adaptation": f"test split inputs without labels, first {n} per task",
                            "learn_seconds": learn_s}}
    return extra, merged
