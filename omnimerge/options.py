"""How a merge runs (not what it computes): one options object shared by the API, the engine and modality merging.

The recipe says *what* to merge (inputs, method, parameters, selection, dtypes); :class:`MergeOptions` says *how*
(device, worker threads, progress, checks, kernels, where the output may go). Changing an option never changes
the merged values, with one exception stated where it applies (``device``: float results may differ in the last
bits on another device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from omnimerge.errors import RecipeError

Strategy = Literal["auto", "whole"]
STRATEGIES: tuple[str, ...] = ("auto", "whole")


@dataclass(frozen=True)
class MergeOptions:
    """How a merge runs.

    Attributes:
        overwrite: replace an existing output folder (written aside and swapped in only on success).
        device: where the math runs (``cpu``, ``cuda``, ``cuda:1``); the output stays where the sink puts it.
        workers: worker threads merging tensors concurrently (default: ``min(4, cores)``).
        progress: show progress bars.
        echo: receives one-line notes for the user (each distinct note once).
        check_finite: fail with the tensor's name when an input or result holds NaN/Inf.
        hash_inputs: digest of every input file in the model card: True or ``"xxh3"``, ``"sha256"``, or
            False / ``"none"``.
        use_kernels: the compiled fused kernels where they apply (bit-identical to the torch path, faster).
        sync: flush the output to disk before it is committed.
        strategy: ``auto`` (stream tensors block by block where the method declares it can) or ``whole``
            (every tensor merged whole: the reference path the streamed ones are tested against).
        keep_inputs: for repeated merges in memory (:class:`omnimerge.Merger`): keep the merged tensors' inputs
            (base and task vectors, or the experts' weights, in the compute dtype on the compute device) after
            the first merge, if they fit in half the free memory, so that later merges read no checkpoint and
            an elementwise method costs one pass over memory. The results are the same bits. It pays where the
            inputs are costly to produce each time: LoRA experts (the dense B A is built once), a GPU (no copy
            to the device per merge). For full checkpoints on the CPU the page cache already keeps the inputs,
            and the streamed kernels read them in their stored dtype: measured on qwen2-0.5b shapes, 3 experts
            (``benchmarks/bench_memory_merge.py``), later merges took 1.09 s (task arithmetic) and 3.0 s (TIES)
            without it, 1.44 s and 10.0 s with it (7 GB kept).
        resume: continue an unfinished earlier run of the same merge into the same output (killed, out of
            memory, power loss): the tensors it wrote whose bytes verify against its journal are kept, the rest
            merged, and the output is byte-identical to an uninterrupted run's. A merge that fails or is
            interrupted with ``resume`` keeps its unfinished folder (hidden, beside the output) for the next
            resumed run. Only for merges into one checkpoint folder.
    """

    overwrite: bool = False
    device: str | None = None
    workers: int | None = None
    progress: bool = False
    echo: Callable[[str], None] | None = None
    check_finite: bool = True
    hash_inputs: bool | str = True
    use_kernels: bool = True
    sync: bool = True
    strategy: Strategy = "auto"
    keep_inputs: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise RecipeError(f"workers: must be a positive integer, got {self.workers!r}")

    def with_(self, **changes: Any) -> MergeOptions:
        """A copy with ``changes`` applied (unknown names are an error)."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise TypeError(f"MergeOptions has no option {bad[0]!r} (options: {', '.join(sorted(known))})")
        return replace(self, **changes)


def as_options(options: MergeOptions | None = None, **kwargs: Any) -> MergeOptions:
    """``options`` (or the defaults) with the keyword arguments that are not None applied."""
    base = options or MergeOptions()
    changes = {k: v for k, v in kwargs.items() if v is not None}
    return base.with_(**changes) if changes else base
