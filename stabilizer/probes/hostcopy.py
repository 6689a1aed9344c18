"""The step's one device->host copy, started now and waited for when it is needed.

A blocking ``.cpu()`` at the end of a step is a host-device sync: the host waits
for the GPU to finish the step before it can queue the next one, and the GPU then
idles while the host catches up. Judging a step one step late removes that stall:
the step's readings are copied with ``non_blocking=True`` into page-locked (pinned)
host memory behind a CUDA event, and the event is waited on a step later, when the
copy finished long ago.

    >>> copy = HostCopies()
    >>> pending = copy.start(flat)          # returns at once on a GPU
    >>> values = pending.wait()             # numpy; waits only if the copy still runs

On the CPU the readings already live on the host: nothing is copied and nothing
waits. Other devices copy with a plain, blocking ``.cpu()``.
"""

from __future__ import annotations

import numpy as np
import torch


class InFlight:
    """One step's readings on their way to the host."""

    def __init__(self, host: torch.Tensor, numel: int, event, pool: HostCopies | None) -> None:
        self._host = host
        self._numel = numel
        self._event = event
        self._pool = pool
        self._values: np.ndarray | None = None

    def done(self) -> bool:
        """True when ``wait()`` would not block."""
        return self._values is not None or self._event is None or self._event.query()

    def wait(self) -> np.ndarray:
        """The readings as a numpy array, float32 or float64 as copied (waits for the copy if
        it still runs)."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()  # the step's deliberate sync, a step late
            # A copy out of the pinned buffer, which goes back to the pool for reuse.
            values = self._host[: self._numel].numpy()
            self._values = values.copy() if self._pool is not None else values
            if self._pool is not None:
                self._pool.give_back(self._host)
            self._host = None
        return self._values


class HostCopies:
    """Pinned host buffers for non-blocking copies, reused across steps.

    Allocating pinned memory is slow (``cudaHostAlloc``), so buffers are kept; each is
    lent to one step in flight and given back when that step's readings are read, so
    two steps in flight (judging one step late) hold two buffers.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def start(self, flat: torch.Tensor) -> InFlight:
        if flat.dim() != 1 or flat.dtype not in (torch.float32, torch.float64):
            flat = flat.detach().reshape(-1).float()  # a step's readings already are
        if flat.device.type == "cpu":
            return InFlight(flat, flat.numel(), None, None)
        if flat.device.type != "cuda":
            return InFlight(flat.cpu(), flat.numel(), None, None)  # blocking: no events
        host = self._borrow(flat.numel(), flat.dtype)
        host[: flat.numel()].copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(flat.device))
        return InFlight(host, flat.numel(), event, self)

    def _borrow(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        for i, buffer in enumerate(self._free):
            if buffer.numel() >= numel and buffer.dtype == dtype:
                return self._free.pop(i)
        # Headroom: full steps and check steps differ in size, and a module called
        # once more than before must not cost a new allocation.
        return torch.empty(max(2 * numel, 1024), dtype=dtype, pin_memory=True)

    def give_back(self, buffer: torch.Tensor) -> None:
        self._free.append(buffer)
