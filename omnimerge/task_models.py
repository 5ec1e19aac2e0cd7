"""Per-task models from one unified merge (EMR-Merging, TALL masks): the masks and rescalers beside the
checkpoint, and the loader that rebuilds an expert's task-specific model.

A merge with ``task_models: true`` (methods declaring ``Capabilities.task_masks``: ``emr``, ``consensus``)
writes, inside its output folder::

    task_models/task_models.json        tasks, rescalers, scaling, the base model, sizes
    task_models/masks.safetensors       per merged tensor: uint8 (T, ceil(N / 8)), the T masks bit-packed
                                        (numpy packbits, little bit order, over the row-major flattened tensor)

Task t's model is W_t = W0 + r_t M_t * tau_uni with tau_uni = (W_uni - W0) / scaling (W_uni the unified
checkpoint, W0 the base) on the merged tensors, and the unified (= base) tensors elsewhere. The masks cost
T / 8 bytes per merged entry instead of T full experts. Per method:

- ``emr``: M_t = [tau_t gamma > 0], r_t = sum |tau_t| / sum |M_t tau_uni| (EMR-Merging's task-specific models).
- ``consensus``: M_t the TALL masks m_t = [|tau_t| > lambda |tau_MTL - tau_t|] the merge counts, r_t = 1. The
  unified vector holds tau_MTL only where c = sum_t m_t >= k (``prun_thre_k``), so task t's model is
  W0 + m_t [c >= k] tau_MTL: with k <= 1 exactly TALL's theta0 + m_t tau_MTL (Wang et al., ICML 2024); with
  k >= 2 it lacks the entries kept by fewer than k tasks (the merge says so in a note).

The rebuilt models carry the unified checkpoint's rounding: W_uni = W0 + scaling tau_uni is rounded to its
dtype, and (W_uni - W0) / scaling recovers tau_uni up to that. With ``scaling`` 1 (EMR's) and the experts in the
base's dtype, each entry of EMR's W_uni is an expert's weight; consensus's is W0 plus a sum of T task vectors,
rounded once more, so its task models are theta0 + m_t tau_MTL to within a few units in the last place of the
weights (exactly where the sums are exact in the dtype).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnimerge.checkpoint.files import copy_auxiliary
from omnimerge.checkpoint.reader import Checkpoint
from omnimerge.checkpoint.writer import AtomicOutput, ShardedWriter, check_output_apart
from omnimerge.errors import OmniMergeError, RecipeError
from omnimerge.methods.base import TaskMasks

TASK_DIR = "task_models"
INDEX = "task_models.json"
MASKS_PREFIX = "masks"
FORMAT = 1


def packed_shape(numel: int, tasks: int) -> tuple[int, int]:
    return (tasks, math.ceil(numel / 8))


def pack(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The masks (bool, one shape) as uint8 (T, ceil(N / 8)), little bit order."""
    rows = [np.packbits(m.reshape(-1).cpu().numpy(), bitorder="little") for m in masks]
    return torch.from_numpy(np.stack(rows))


def unpack(packed: torch.Tensor, task: int, shape: Sequence[int]) -> torch.Tensor:
    """Task ``task``'s mask (bool, ``shape``) from :func:`pack`'s output."""
    n = math.prod(shape)
    bits = np.unpackbits(packed[task].numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


class TaskMaskWriter:
    """Collects the masks of every merged tensor (thread-safe, written as they come: memory stays bounded) and
    the rescalers' sums; :meth:`finish` writes the index. Lives in the run's temporary output folder."""

    def __init__(self, folder: Path, tensors: Sequence[tuple[str, tuple[int, ...]]], tasks: Sequence[str],
                 shard_bytes: int, sync: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tasks = list(tasks)
        self.shapes = {n: tuple(s) for n, s in tensors}
        plan = [(n, torch.uint8, packed_shape(math.prod(s), len(self.tasks))) for n, s in tensors]
        self.writer = ShardedWriter(self.folder, plan, shard_bytes, prefix=MASKS_PREFIX,
                                    metadata={"omnimerge_task_masks": str(FORMAT)}, sync=sync)
        self._lock = threading.Lock()
        self.l1_tau = [0.0] * len(self.tasks)
        self.l1_kept = [0.0] * len(self.tasks)
        self.rescale = True

    def add(self, name: str, tm: TaskMasks) -> None:
        if len(tm.masks) != len(self.tasks):
            raise OmniMergeError(f"tensor '{name}': {len(tm.masks)} task masks for {len(self.tasks)} experts")
        self.writer.write(name, pack(tm.masks))
        with self._lock:
            for i in range(len(self.tasks)):
                self.l1_tau[i] += tm.l1_tau[i]
                self.l1_kept[i] += tm.l1_kept[i]
            self.rescale = self.rescale and tm.rescale

    def finish(self, *, method: str, scaling: float, base_model: str, expert_bytes: int) -> dict[str, Any]:
        """Write the shards and the index; return the index (also for the merge report)."""
        shards = self.writer.finish()
        rescalers = [(a / b if b > 0 else 1.0) if self.rescale else 1.0
                     for a, b in zip(self.l1_tau, self.l1_kept, strict=True)]
        mask_bytes = sum(p.stat().st_size for p in shards)
        index = {
            "format": FORMAT, "method": method, "tasks": self.tasks, "rescalers": rescalers, "scaling": scaling,
            "base_model": base_model, "shards": [p.name for p in shards], "mask_bytes": mask_bytes,
            "experts_bytes": expert_bytes, "tensors": {n: list(s) for n, s in self.shapes.items()},
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))
        return index

    def close(self) -> None:
        self.writer.close()


def read_index(path: str | Path) -> dict[str, Any]:
    index = Path(path) / TASK_DIR / INDEX
    if not index.is_file():
        raise RecipeError(f"{path}: no per-task masks ({TASK_DIR}/{INDEX} missing; merge with task_models: true and a "
                          f"method that has them: emr, consensus)")
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise OmniMergeError(f"{index}: unreadable ({e})") from None
    if data.get("format") != FORMAT:
        raise OmniMergeError(f"{index}: format {data.get('format')!r}, this omnimerge reads format {FORMAT}")
    return data


def _task_index(index: dict[str, Any], task: str | int, where: Path) -> int:
    tasks = index["tasks"]
    if isinstance(task, int) or (isinstance(task, str) and task.isdigit() and task not in tasks):
        i = int(task)
        if not 0 <= i < len(tasks):
            raise RecipeError(f"{where}: task {i} out of range (0..{len(tasks) - 1}: {', '.join(tasks)})")
        return i
    if task not in tasks:
        raise RecipeError(f"{where}: no task '{task}' (tasks: {', '.join(tasks)})")
    return tasks.index(task)


def iter_task_model(path: str | Path, task: str | int, base: str | Path | None = None):  # type: ignore[no-untyped-def]
    """Yield (name, tensor) of task ``task``'s model (a name from the index or a 0-based number), tensor by
    tensor, in the unified checkpoint's order and dtypes. ``base``: the base model folder (default: the one
    recorded at merge time)."""
    path = Path(path)
    index = read_index(path)
    t = _task_index(index, task, path)
    r, scaling = float(index["rescalers"][t]), float(index["scaling"])
    if scaling == 0:
        raise OmniMergeError(f"{path}: merged with scaling 0; the unified task vector cannot be recovered")
    base_dir = Path(base) if base is not None else Path(index["base_model"])
    from safetensors import safe_open

    masks_dir = path / TASK_DIR
    handles = [safe_open(str(masks_dir / s), "pt") for s in index["shards"]]
    where = {k: h for h in handles for k in h.keys()}  # noqa: SIM118
    with Checkpoint(path) as uni, Checkpoint(base_dir) as b0:
        for name in uni.tensors:
            w = uni.read(name)  # a view of the mapped file: copied before it leaves (the map closes after)
            if name not in index["tensors"]:
                yield name, w.clone()
                continue
            if name not in b0.tensors:
                raise OmniMergeError(f"{base_dir}: base model lacks tensor '{name}' of {path}")
            if name not in where:
                raise OmniMergeError(f"{masks_dir}: no mask for tensor '{name}'")
            w0 = b0.read(name).to(torch.float32, copy=True)  # a fresh tensor: the mapped base is never written
            mask = unpack(where[name].get_tensor(name), t, index["tensors"][name])
            tau = (w.to(torch.float32) - w0).div_(scaling)
            yield name, w0.add_(tau.mul_(mask.to(torch.float32)), alpha=r).to(w.dtype)


def load_task_model(path: str | Path, task: str | int, base: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Task ``task``'s model rebuilt from the unified merge at ``path`` and its masks: a state dict with the
    checkpoint's names (load it with ``model.load_state_dict``, or write a folder with
    ``omnimerge task-model``)."""
    return dict(iter_task_model(path, task, base))


def write_task_model(path: str | Path, task: str | int, output: str | Path, *, base: str | Path | None = None,
                     overwrite: bool = False, shard_bytes: int = 5 * 10**9) -> dict[str, Any]:
    """Materialise task ``task``'s model as a checkpoint folder ``output`` (atomically, tensor by tensor, with the
    unified folder's config and tokenizer files); returns what was written."""
    path, output = Path(path), Path(output)
    index = read_index(path)
    check_output_apart(output, [("unified merge", path), ("base model", Path(base or index["base_model"]))])
    t = _task_index(index, task, path)
    with Checkpoint(path) as uni:
        plan = [(n, m.dtype, m.shape) for n, m in uni.tensors.items()]
    with AtomicOutput(output, overwrite) as out:
        tmp = out.folder()
        writer = ShardedWriter(tmp, plan, shard_bytes, metadata={"omnimerge_task_model": index["tasks"][t]})
        try:
            for name, tensor in iter_task_model(path, t, base):
                writer.write(name, tensor)
            shards = writer.finish()
        finally:
            writer.close()
        copy_auxiliary(path, tmp, None)
        out.commit()
    return {"task": index["tasks"][t], "rescaler": index["rescalers"][t], "output": str(output),
            "shards": [p.name for p in shards]}


__all__ = ["TaskMaskWriter", "load_task_model", "pack", "read_index", "unpack", "write_task_model"]
