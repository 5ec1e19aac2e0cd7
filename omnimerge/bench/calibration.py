"""Calibration batches for ``omnimerge stats`` from the miniature suite's **training** split (never the test
split): the examples encoded exactly as training and evaluation encode them (left-padded prompt with the image
tokens, the answer and ``</s>``; CLIP-normalised pixels), the answer tokens as labels."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from omnimerge.bench import TASKS
from omnimerge.bench.data import make_split
from omnimerge.bench.model import Encoder
from omnimerge.bench.train import encode, normalize_pixels
from omnimerge.errors import OmniMergeError
from omnimerge.stats import Batch

#: the only split calibration may come from
SPLIT = "train"


def bench_batches(tasks: Sequence[str], n: int, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """``n`` training examples of each task in ``tasks``, in batches of ``batch_size``."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise OmniMergeError(f"--calib bench:{','.join(tasks)}: unknown task '{bad[0]}' (known: {', '.join(TASKS)})")
    enc = Encoder()
    for task in tasks:
        examples = make_split(task, SPLIT, n, seed)
        for s in range(0, len(examples), batch_size):
            td = encode(examples[s:s + batch_size], enc)
            yield Batch({"input_ids": td.ids, "attention_mask": td.mask, "pixel_values": normalize_pixels(td.pixel)},
                        td.labels)
