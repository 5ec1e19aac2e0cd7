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


#: the splits test-time adaptation may read the inputs of (never their answers)
PROMPT_SPLITS = ("test", "validation", "train")


def check_prompt_source(tasks: Sequence[str], split: str) -> None:
    """One line for an unknown task or split of ``bench:TASKS`` (before any model loads)."""
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise OmniMergeError(f"--data bench:{','.join(tasks)}: unknown task '{bad[0] if bad else ''}' "
                             f"(known: {', '.join(TASKS)})")
    if split not in PROMPT_SPLITS:
        raise OmniMergeError(f"--split: expected one of {', '.join(PROMPT_SPLITS)}, got {split!r}")


def bench_prompt_batches(tasks: Sequence[str], split: str, n: int, batch_size: int,
                         seed: int = 0) -> list[list[Batch]]:
    """Per task, the **prompts only** (no answers, no labels) of the first ``n`` examples of ``split``, encoded as
    evaluation encodes them (left-padded to the prompt length, CLIP-normalised pixels), in batches of
    ``batch_size``: ``omnimerge adamerge``'s unlabelled adaptation inputs. The split's examples are the bench's:
    its test stream (``seed``) or its validation stream (``seed + 17``, as ``omnimerge bench`` draws it)."""
    from omnimerge.bench.evaluate import build_evalset
    from omnimerge.bench.model import PAD

    check_prompt_source(tasks, split)
    enc = Encoder()
    out = []
    for task in tasks:
        es = build_evalset(task, split, n, seed + 17 if split == "validation" else seed, enc)
        batches = []
        for s in range(0, len(es), batch_size):
            ids = es.ids[s:s + batch_size]
            batches.append(Batch({"input_ids": ids, "attention_mask": (ids != PAD).long(),
                                  "pixel_values": es.pixel[s:s + batch_size]}))
        out.append(batches)
    return out
