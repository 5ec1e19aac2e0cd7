#!/usr/bin/env python
"""End-to-end CPU throughput of ``omnimerge eval`` (:func:`omnimerge.eval.runner.evaluate`) on a tiny
random-weight VLM: read a ChartQA-format parquet of N rows (64 x 48 images), load the model, generate, score,
write results and predictions. Prints examples/s end to end and for generation alone (the backend's), so the
runner's own overhead (data, requests, scoring, files) is the difference::

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python benchmarks/bench_eval_run.py -n 128 --family qwen2_vl

ChartQA's generation length (16 new tokens) is used; a random-weight model seldom stops early, so every request
generates all 16. The numbers say nothing about a 7B model, whose time is the model's."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("-n", type=int, default=128, help="rows of the dataset")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import torch
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from tiny_vlms import save_tiny_vlm

    from omnimerge.eval.runner import evaluate

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        model = save_tiny_vlm(args.family, root / "model")
        rows = [{"type": "human_test", "question": f"What is the value of bar {i}?", "answer": str(i),
                 "image": PILImage.new("RGB", (64, 48), (i % 255, 30, 30))} for i in range(args.n)]
        feats = Features({"type": Value("string"), "question": Value("string"), "answer": Value("string"),
                          "image": Image()})
        Dataset.from_list(rows, features=feats).to_parquet(str(root / "chartqa.parquet"))
        t0 = time.perf_counter()
        res = evaluate(model, ["chartqa"], data={"chartqa": root / "chartqa.parquet"}, out=root / "out",
                       batch_size=args.batch_size, progress=False)
        total = time.perf_counter() - t0
    gen = res["seconds"]["generate_and_score"]
    print(f"{args.family}, {args.n} ChartQA examples, batch {args.batch_size}, 1 thread, float32:")
    print(f"  end to end (data + model load + generate + score + write): {total:.2f} s, {args.n / total:.1f} ex/s")
    print(f"  model load: {res['seconds']['load']:.2f} s; generate + score: {gen:.2f} s, "
          f"{res['requests_per_s']:.1f} ex/s")


if __name__ == "__main__":
    main()
