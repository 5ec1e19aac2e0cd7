#!/usr/bin/env python
"""CPU throughput of the transformers evaluation backend on tiny random-weight VLMs (tests/tiny_vlms.py).

Requests: one 64 x 48 image and a short question each, at most 16 new tokens (a random-weight model seldom
emits its end token), greedy, float32, one thread. Prints requests/s per family and batch size::

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 python benchmarks/bench_eval_backend.py --batch-sizes 1,8

The number measures the backend's own overhead (chat template, processor, padding, decoding) plus a
64-wide two-layer model: it says nothing about a 7B model, whose time is the model's."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="qwen2_vl,llava")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("-n", type=int, default=64, help="requests per measurement")
    args = ap.parse_args()

    import torch
    from PIL import Image
    from tiny_vlms import save_tiny_vlm

    from omnimerge.eval.backends import TransformersBackend
    from omnimerge.eval.protocol import Request

    torch.set_num_threads(1)
    reqs = [Request((Image.new("RGB", (64, 48), (i * 3 % 255, 80, 120)),),
                    "what is the color of the box " * (1 + i % 3), 16) for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        for fam in args.families.split(","):
            folder = save_tiny_vlm(fam, Path(tmp) / fam)
            for bs in map(int, args.batch_sizes.split(",")):
                b = TransformersBackend.from_source(folder, batch_size=bs, progress=False)
                b.generate(reqs[:bs])  # warm-up
                b.generate(reqs)
                s = b.last_stats
                print(f"{fam:10s} batch {bs:3d}: {s['requests_per_s']:7.1f} requests/s "
                      f"({args.n} requests in {s['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
