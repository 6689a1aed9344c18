"""``--on-anomaly repair``: apply the diagnosed cause's mechanical fix in place.

| cause                                         | repair                                         |
|-----------------------------------------------|------------------------------------------------|
| fp16-adam-eps, fp16-adam-underflow,           | upcast the trainable tensors and their         |
| fp16-adam-overflow                            | optimizer state to fp32 (step counts kept),    |
|                                               | and run the forward under autocast in the base |
|                                               | weights' dtype so fp32 adapters meet fp16 ones |
| activation-, attention-, float-overflow in M  | run M in fp32 from now on (its weights and     |
|                                               | inputs upcast, autocast off inside it)         |
| nonfinite-input, all-labels-masked            | drop the batch (its update undone), count it   |
| update-too-large, divergence-overflow         | roll back and lower the learning rate          |
| anything else (gradscaler-misuse included)    | none: stop with the card                       |

The session restores the pre-step state first (for fp16-adam-overflow, the state
before the unstable update it follows from); stabilizer's own loop then redoes
the step on the same batch, a loop it did not write goes on with its next batch
(the step's update stays undone). Each object here owns its hook handles and
removes them in ``remove()``.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

UPCAST_CAUSES = ("fp16-adam-eps", "fp16-adam-underflow", "fp16-adam-overflow")
MODULE_FP32_CAUSES = ("activation-overflow", "attention-overflow", "float-overflow")
DROP_CAUSES = ("nonfinite-input", "all-labels-masked")
ROLLBACK_CAUSES = ("update-too-large", "divergence-overflow")


def repair_kind(cause: str, pass_: str) -> str | None:
    """``upcast``, ``module-fp32``, ``drop``, ``rollback``, or None (no mechanical fix)."""
    if cause in UPCAST_CAUSES:
        return "upcast"
    if cause in MODULE_FP32_CAUSES and pass_ == "forward":
        return "module-fp32"
    if cause in DROP_CAUSES:
        return "drop"
    if cause in ROLLBACK_CAUSES:
        return "rollback"
    return None


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


@torch.no_grad()
def upcast_state(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """fp16/bf16 trainable tensors and their optimizer state to fp32, exactly (values
    converted, 0-d step counts untouched); gradients are dropped (the step is redone).
    Returns how many tensors changed."""
    changed = 0
    for param in params:
        if _half(param.dtype):
            param.data = param.data.float()
            param.grad = None
            changed += 1
        state = optimizer.state.get(param)
        for key, value in (state or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and _half(value.dtype):
                state[key] = value.float()
    return changed


class AutocastForward:
    """Run ``module``'s forward under ``torch.autocast(dtype)`` (hooks, not a wrapper:
    the module and its callers stay as they are). No effect where autocast is already
    on, as in a loop that enables it itself."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._contexts: list = []
        self.handles = [
            module.register_forward_pre_hook(self._enter),
            # always_call: an exception inside forward must not leave autocast on.
            module.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module, args):
        device = next((p.device.type for p in module.parameters()), "cpu")
        context = None
        if not torch.is_autocast_enabled(device):
            context = torch.autocast(device_type=device, dtype=self.dtype)
            context.__enter__()
        self._contexts.append(context)

    def _exit(self, module, args, output):
        context = self._contexts.pop() if self._contexts else None
        if context is not None:
            context.__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Float32Module:
    """Run one module in fp32 from now on: its parameters and buffers upcast (with
    their optimizer state), its floating inputs upcast, autocast off inside it; its
    output goes back to the caller's dtype unless autocast is on outside it (then the
    next op casts as it needs)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.module = module
        params = list(module.parameters())
        with torch.no_grad():
            for p in params:
                if _half(p.dtype):
                    p.data = p.data.float()
                    if p.grad is not None:
                        p.grad = None
            for name, buf in module.named_buffers():
                if _half(buf.dtype):
                    owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
                    owner._buffers[name.rpartition(".")[2]] = buf.float()
        if optimizer is not None:
            upcast_state([p for p in params if p in optimizer.state], optimizer)
        self._frames: list = []
        self.handles = [
            module.register_forward_pre_hook(self._enter, with_kwargs=True),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module, args, kwargs):
        device = next((p.device.type for p in module.parameters()), "cpu")
        outer = torch.is_autocast_enabled(device)
        dtypes = [t.dtype for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        caller = next((d for d in dtypes if d.is_floating_point), None)
        context = torch.autocast(device_type=device, enabled=False)
        context.__enter__()
        self._frames.append((context, outer, caller))

        def up(t):
            return t.float() if isinstance(t, torch.Tensor) and _half(t.dtype) else t

        return tree_map(up, args), tree_map(up, kwargs)

    def _exit(self, module, args, output):
        if not self._frames:
            return output
        context, outer, caller = self._frames.pop()
        context.__exit__(None, None, None)
        if outer or caller is None or not _half(caller):
            return output

        def down(t):
            return t.to(caller) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        return tree_map(down, output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
