"""Where merged tensors go: the sink protocol and the in-memory sinks.

The engine streams every planned output tensor into a :class:`Sink`, whole (``write``), block by block
(``write_part``), byte for byte from an input (``copy_raw``), or by amending entries already written
(``patch``: the streamed TIES path fixes the few entries whose majority sign was only known at the end). Sinks:

* :class:`omnimerge.checkpoint.writer.ShardedWriter`: safetensors shards on disk (``omnimerge merge``);
* :class:`StateDictSink`: a dict of tensors in memory, on any device;
* :class:`ModelSink`: straight into the parameters and buffers of a model already loaded (any device);
* the modality merge's fan-out (one merged LLM into one checkpoint per modality expert);
* :class:`omnimerge.checkpoint.lora.LoraAdapterSink`: the merged change as a PEFT LoRA adapter
  (``output: lora``; whole tensors, factorised as they arrive).

Every sink checks what it receives against what was planned (name, dtype, shape) and ``finish`` fails if a
planned tensor never arrived: a sink never ends with a silently missing tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from omnimerge.errors import OutputError

Plan = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]


@runtime_checkable
class Sink(Protocol):
    """What the engine writes merged tensors into (all methods may be called from several threads).

    ``whole_tensors``: the sink takes each merged tensor whole through ``write`` (e.g. the LoRA adapter output,
    which factorises it), so the engine does not stream it block by block for this sink."""

    whole_tensors: bool

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The whole tensor ``name`` (cast to its planned dtype if needed)."""

    def write_part(self, name: str, part: torch.Tensor, start: int, last: bool) -> None:
        """The flat entries ``[start, start + part.numel())`` of ``name`` (planned dtype); ``last`` completes it."""

    def patch(self, name: str, index: Any, values: torch.Tensor) -> None:
        """Overwrite the flat entries ``index`` (ascending int64 numpy array) of a written tensor."""

    def copy_raw(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """``nbytes`` from an input file descriptor, byte for byte, as the tensor's data."""

    def finish(self) -> list[Path]:
        """Check every planned tensor arrived and complete the output; the files written (none in memory)."""

    def close(self) -> None:
        """Release what the sink holds (after ``finish``, or on failure)."""


class _Slot:
    __slots__ = ("dtype", "name", "numel", "shape", "target", "written")

    def __init__(self, name: str, target: torch.Tensor, dtype: torch.dtype) -> None:
        self.name = name
        self.target = target
        self.dtype = dtype  # the planned dtype (what the engine sends; the target may hold another)
        self.shape = tuple(target.shape)
        self.numel = target.numel()
        self.written = False


class _MemorySink:
    """Writes into preallocated tensors (the shared machinery of the in-memory sinks)."""

    whole_tensors = False

    def __init__(self, targets: Mapping[str, tuple[torch.Tensor, torch.dtype]]) -> None:
        self._slots: dict[str, _Slot] = {}
        for name, (t, dtype) in targets.items():
            if not t.is_contiguous():
                raise OutputError(f"tensor '{name}': the target is not contiguous (cannot be written in place)")
            self._slots[name] = _Slot(name, t, dtype)

    def _slot(self, name: str) -> _Slot:
        s = self._slots.get(name)
        if s is None:
            raise OutputError(f"tensor '{name}' is not part of the planned output")
        return s

    def _flat(self, s: _Slot) -> torch.Tensor:
        return s.target.view(-1)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        s = self._slot(name)
        if tuple(tensor.shape) != s.shape:
            raise OutputError(f"tensor '{name}': shape {list(tensor.shape)} to write, {list(s.shape)} planned")
        with torch.no_grad():
            s.target.copy_(tensor)
        s.written = True

    def write_part(self, name: str, part: torch.Tensor, start: int, last: bool) -> None:
        s = self._slot(name)
        n = part.numel()
        if start < 0 or start + n > s.numel:
            raise OutputError(f"tensor '{name}': part [{start}, +{n}) lies outside the tensor")
        with torch.no_grad():
            self._flat(s)[start:start + n].copy_(part.reshape(-1))
        if last:
            s.written = True

    def patch(self, name: str, index: Any, values: torch.Tensor) -> None:
        s = self._slot(name)
        if len(index) == 0:
            return
        if int(index[0]) < 0 or int(index[-1]) >= s.numel:
            raise OutputError(f"tensor '{name}': patch index outside the tensor's {s.numel} elements")
        idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)).to(s.target.device)
        with torch.no_grad():
            self._flat(s)[idx] = values.to(device=s.target.device, dtype=s.target.dtype)

    def copy_raw(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        s = self._slot(name)
        dtype = s.dtype
        if nbytes != s.numel * dtype.itemsize:
            raise OutputError(f"tensor '{name}': {nbytes} bytes to copy, {s.numel * dtype.itemsize} planned")
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(src_fd, [view[done:]], src_offset + done)
            if n <= 0:
                raise OutputError(f"input ended early while copying tensor '{name}'")
            done += n
        src = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        with torch.no_grad():
            self._flat(s).copy_(src)
        s.written = True

    def missing(self) -> list[str]:
        return [s.name for s in self._slots.values() if not s.written]

    def finish(self) -> list[Path]:
        missing = self.missing()
        if missing:
            raise OutputError(
                f"internal error: {len(missing)} planned tensor(s) were never written, e.g. '{missing[0]}'")
        return []

    def close(self) -> None:
        return None


class StateDictSink(_MemorySink):
    """A state dict in memory: ``tensors`` maps each planned name (the base checkpoint's names) to a tensor of
    its planned dtype and shape on ``device``. Reuse one sink for repeated merges with :meth:`reset`."""

    def __init__(self, plan: Plan, device: str | torch.device = "cpu") -> None:
        dev = torch.device(device)
        self.tensors: dict[str, torch.Tensor] = {
            name: torch.empty(tuple(shape), dtype=dtype, device=dev) for name, dtype, shape in plan}
        super().__init__({name: (self.tensors[name], dtype) for name, dtype, _ in plan})

    def reset(self) -> None:
        """Mark every tensor unwritten (their memory is reused by the next merge)."""
        for s in self._slots.values():
            s.written = False


class ModelSink(_MemorySink):
    """Writes into the tensors of a loaded model (``model.state_dict()`` entries, parameters and buffers, on any
    device and in the model's own dtype), matched to the base checkpoint's names through their canonical forms
    (so a model whose transformers version names modules differently from the checkpoint on disk lines up).

    ``names``: the planned tensors this merge writes. A planned tensor with no counterpart in the model, or one
    whose shape differs, is an error before any work; model tensors that the checkpoint does not hold (e.g. a
    tied ``lm_head``) are left as they are.
    """

    def __init__(self, model: Any, plan: Plan, canonical: Mapping[str, str]) -> None:
        from omnimerge.checkpoint.names import canonical_name

        state = model.state_dict(keep_vars=True)
        by_canonical: dict[str, torch.Tensor] = {}
        for key, t in state.items():
            by_canonical.setdefault(canonical_name(key), t.data if isinstance(t, torch.nn.Parameter) else t)
        targets: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
        for name, dtype, shape in plan:
            t = by_canonical.get(canonical.get(name, name))
            if t is None:
                raise OutputError(
                    f"tensor '{name}': the model ({type(model).__name__}) has no parameter or buffer of that name "
                    f"(canonical '{canonical.get(name, name)}')")
            if tuple(t.shape) != tuple(shape):
                raise OutputError(
                    f"tensor '{name}': the model's tensor has shape {list(t.shape)}, the merge writes {list(shape)}")
            targets[name] = (t, dtype)
        super().__init__(targets)
