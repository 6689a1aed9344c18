"""What training does about an anomaly: raise, skip, clip, rollback or warn.

| policy   | on an anomaly                                                              |
|----------|----------------------------------------------------------------------------|
| raise    | stop with the diagnosis (the default with --trace)                         |
| skip     | undo the step's update (weights and optimizer state as before the step);   |
|          | the learning-rate schedule does not advance                                |
| clip     | as skip, and clamp the offender's output to the dtype's safe range from    |
|          | now on (forward overflow), or halve --max-grad-norm (backward/optimizer)   |
| rollback | restore the last good state (kept every ``rollback_every`` clean steps)    |
|          | and multiply the learning rate by ``rollback_lr_factor``                    |
| warn     | print and go on (the update is applied: NaN weights stay NaN)              |
| repair   | undo the step, apply the cause's fix (detector/repair.py), redo the step   |
|          | in stabilizer's loop; stop where no mechanical fix exists                   |

Every policy stops with the diagnosis after ``max_anomalies`` anomalies, so a
run can never skip every batch in silence.
"""

from __future__ import annotations

import torch

from stabilizer.detector.diagnosis import Anomaly
from stabilizer.errors import StabilizerError

POLICIES = ("raise", "skip", "clip", "rollback", "warn", "repair")


class NumericalAnomalyError(StabilizerError):
    """Training stopped on a NaN/Inf; ``anomaly`` holds the diagnosis."""

    def __init__(self, anomaly: Anomaly, reason: str) -> None:
        self.anomaly = anomaly
        super().__init__(f"{reason}\n{anomaly.card()}")


class StateSnapshot:
    """A copy of the trainable tensors and the optimizer's state, restorable in place.

    LoRA keeps both small (a few MB even for the real-size Q-Former), so taking
    one before every step is cheap next to the step itself.
    """

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer):
        self.params = params
        self.optimizer = optimizer
        self._weights: list[torch.Tensor] | None = None
        self._state: dict[int, dict] | None = None

    @torch.no_grad()
    def capture(self) -> None:
        # Taken every step when a policy or the replay may need it: into the buffers of
        # the last capture with one multi-tensor copy per kind of tensor (a handful of
        # ops), not a clone per tensor (hundreds of ops on a real-size Q-Former).
        if self._weights is not None and _same_layout(self._weights, self.params):
            torch._foreach_copy_(self._weights, self.params)
        else:
            self._weights = [p.detach().clone() for p in self.params]
        states = {i: st for i, p in enumerate(self.params) if (st := self.optimizer.state.get(p))}
        if self._state is not None and self._state_fits(states):
            for saved, live in self._by_key(states).values():
                torch._foreach_copy_(saved, live)
            for i, st in states.items():
                for key, value in st.items():
                    if not isinstance(value, torch.Tensor):
                        self._state[i][key] = value
        else:
            self._state = {
                i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                for i, st in states.items()
            }

    def _state_fits(self, states: dict[int, dict]) -> bool:
        if states.keys() != self._state.keys():
            return False
        for i, st in states.items():
            saved = self._state[i]
            if st.keys() != saved.keys():
                return False
            for key, value in st.items():
                old = saved[key]
                if isinstance(value, torch.Tensor) != isinstance(old, torch.Tensor):
                    return False
                if isinstance(value, torch.Tensor) and not _same_layout([old], [value]):
                    return False
        return True

    def _by_key(self, states: dict[int, dict]) -> dict[str, tuple[list, list]]:
        grouped: dict[str, tuple[list, list]] = {}
        for i, st in states.items():
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    saved, live = grouped.setdefault(key, ([], []))
                    saved.append(self._state[i][key])
                    live.append(value)
        return grouped

    @property
    def ready(self) -> bool:
        return self._weights is not None

    def nbytes(self) -> int:
        """Bytes this snapshot holds (weights and optimizer state tensors)."""
        tensors = list(self._weights or [])
        for st in (self._state or {}).values():
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def restore(self) -> None:
        if self._weights is None or self._state is None:
            raise RuntimeError("restore() before capture()")
        torch._foreach_copy_(self.params, self._weights)
        for i, param in enumerate(self.params):
            saved = self._state.get(i)
            if saved is None:
                self.optimizer.state.pop(param, None)
                continue
            state = self.optimizer.state[param]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and isinstance(state.get(key), torch.Tensor):
                    state[key].copy_(value)
                else:
                    state[key] = value.clone() if isinstance(value, torch.Tensor) else value

    def copy_from(self, other: StateSnapshot) -> None:
        self._weights = [w.clone() for w in other._weights] if other._weights else None
        self._state = (
            {
                i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
                for i, st in other._state.items()
            }
            if other._state is not None
            else None
        )


def _same_layout(saved: list[torch.Tensor], live: list[torch.Tensor]) -> bool:
    return len(saved) == len(live) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        for a, b in zip(saved, live, strict=True)
    )


class ClampOutput:
    """A forward hook that clamps a module's output to +-``bound`` (owned, removable)."""

    def __init__(self, module: torch.nn.Module, bound: float) -> None:
        self.bound = bound
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if isinstance(output, torch.Tensor):
            return torch.nan_to_num(output.clamp(-self.bound, self.bound), nan=0.0)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            first = torch.nan_to_num(output[0].clamp(-self.bound, self.bound), nan=0.0)
            return (first, *output[1:])
        return output

    def remove(self) -> None:
        self.handle.remove()
