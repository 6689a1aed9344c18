"""Count what tracing costs in a way that does not depend on the machine: aten ops.

Times on shared machines move 10-50% from run to run; the number of aten ops a
step dispatches does not. Each op is at least one kernel launch on a GPU, so the
ops tracing adds to a step are its cost in launches, and the ``item()``-style
calls among them are host-device syncs.

    >>> counter = OpCounter(optimizer)
    >>> with counter:                       # one step of any loop
    ...     loss = model(**batch).loss; loss.backward(); optimizer.step()
    >>> counter.by_phase                    # {"forward": 812, "backward": 1430, ...}
    >>> counter.syncs                       # {"forward": 0, ...}

Phases: ``forward`` (not in backward, not in the optimizer step), ``backward``
(autograd executing a graph), ``optimizer`` (the optimizer's pre-hooks and its
update), ``judge`` (the optimizer's post-hooks registered after the counter's:
where ``stabilizer.watch`` ends the step, checks it and writes the store). Create
the counter before the watch so its hooks come first.

Syncs are ``aten._local_scalar_dense`` (``item()``, ``bool(t)``, ``float(t)``) and
copies from a device to the host, except a ``non_blocking`` copy into pinned memory
(how a step judged late sends its readings: the wait is a step later, on an event).
On a CPU-only run a tensor already on the host needs no copy, so the step's one
deliberate ``.cpu()`` is not counted there.
Backward ops on CUDA run in autograd's device threads, which a dispatch mode does
not see: count on CPU (the counts are the launches a GPU would make).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("forward", "backward", "optimizer", "judge")
_SYNC_OPS = ("_local_scalar_dense",)


def _to_host(func, args, kwargs, out) -> bool:
    name = func.overloadpacket.__name__
    if name not in ("_to_copy", "copy_"):
        return False
    src = args[1] if name == "copy_" else args[0]
    dst = args[0] if name == "copy_" else out
    if not (
        isinstance(src, torch.Tensor)
        and isinstance(dst, torch.Tensor)
        and src.device.type != "cpu"
        and dst.device.type == "cpu"
    ):
        return False
    # A non-blocking copy into pinned memory returns at once: the host waits only
    # where it reads the result (a step later, when judging late), not here.
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    return not (name == "copy_" and non_blocking and dst.is_pinned())


class OpCounter(TorchDispatchMode):
    """Counts aten ops and host syncs by phase of a training step (see module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__()
        self.by_phase: Counter = Counter()
        self.syncs: Counter = Counter()
        self.ops: Counter = Counter()  # op name -> count, over all phases
        self._phase_override: str | None = None
        self._handles = []
        if optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(self._enter_optimizer),
                optimizer.register_step_post_hook(self._enter_judge),
            ]

    def _enter_optimizer(self, *_):
        self._phase_override = "optimizer"

    def _enter_judge(self, *_):
        self._phase_override = "judge"

    def phase(self) -> str:
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        return self._phase_override or "forward"

    def reset(self) -> None:
        self.by_phase.clear()
        self.syncs.clear()
        self.ops.clear()
        self._phase_override = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        phase = self.phase()
        self.by_phase[phase] += 1
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in _SYNC_OPS or _to_host(func, args, kwargs, out):
            self.syncs[phase] += 1
        return out

    def __exit__(self, *exc):
        self._phase_override = None
        return super().__exit__(*exc)
