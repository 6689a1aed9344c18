"""Turn a tensor into a few numbers without leaving the device.

Nothing here calls ``.item()`` or copies to the host: each function returns small
device tensors that the tracer stacks and copies once per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_WIDE = (torch.float32, torch.float64)


def near_limit_threshold(dtype: torch.dtype) -> float | None:
    """Half the largest finite value of a 16-bit float dtype; None for wider dtypes.

    A value past half the limit has one doubling of headroom left before it
    overflows (fp16: 32752 of 65504), which is where early warnings start.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(dtype).max / 2
    return None


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """0-d fp32 tensor that is finite exactly when every element of ``t`` is (1 kernel).

    NaN and Inf propagate through a sum; accumulating in fp32 keeps a sum of finite
    fp16/bf16 values from overflowing (only a finite fp32 tensor whose sum passes
    3.4e38 would be flagged, which is an overflow warning in itself).
    """
    # no_grad instead of detach(): one aten op fewer per tensor, and the check stays
    # invisible to autograd (no graph, nothing saved for backward).
    with torch.no_grad():
        return t.sum(dtype=torch.float32)


def tensor_stats(t: torch.Tensor) -> torch.Tensor:
    """``[absmax, l2, sum, nan, inf, near]`` as a float32 device tensor of 6.

    The host turns l2 and sum into RMS and mean with the element count it knows,
    so several calls of one module in one step combine exactly.
    """
    with torch.no_grad():  # not detach(): an op fewer, and invisible to autograd
        threshold = near_limit_threshold(t.dtype)
        x = t if t.dtype in _WIDE else t.float()  # fp16 sums overflow long before values
        absmax = torch.linalg.vector_norm(x, ord=math.inf)
        l2 = torch.linalg.vector_norm(x)
        total = x.sum()
        # Counted straight into fp32: no int64 result to convert before the stack.
        nan = torch.isnan(x).sum(dtype=torch.float32)
        inf = torch.isinf(x).sum(dtype=torch.float32)
        near = (
            (x.abs() > threshold).sum(dtype=torch.float32)
            if threshold is not None
            else torch.zeros_like(nan)
        )
        return torch.stack([absmax, l2, total, nan, inf, near])


_compiled = None


def compiled_tensor_stats():
    """:func:`tensor_stats` compiled with ``torch.compile``: one fused pass instead of eight.

    The first call compiles (about 20 s on a 2-core CPU; a Triton kernel on GPU) and
    later shapes reuse it (``dynamic=True``). Where compiling is not possible the
    eager version is returned, with a warning, so tracing never stops for it.
    """
    global _compiled
    if _compiled is not None:
        return _compiled

    def fused(x: torch.Tensor, threshold: float) -> torch.Tensor:
        x = x.float()
        a = x.abs()
        return torch.stack(
            [
                a.amax(),
                (x * x).sum().sqrt(),
                x.sum(),
                torch.isnan(x).sum(dtype=torch.float32),
                torch.isinf(x).sum(dtype=torch.float32),
                (a > threshold).sum(dtype=torch.float32),
            ]
        )

    try:
        candidate = torch.compile(fused, dynamic=True)
        warm = torch.ones(12)
        torch._dynamo.decorators.mark_unbacked(warm, 0)
        candidate(warm, math.inf)  # compile now, not inside the first hook
    except Exception as exc:  # no compiler, unsupported platform, ...
        import warnings

        warnings.warn(
            f"compiled statistics are off ({type(exc).__name__}: {exc}); using eager ones",
            stacklevel=2,
        )
        _compiled = tensor_stats
        return _compiled

    def stats(t: torch.Tensor) -> torch.Tensor:
        x = t.detach().reshape(-1)  # one rank for every tensor: no recompiles per ndim
        # An unbacked size compiles one kernel for every length (no 0/1 or range guards).
        torch._dynamo.decorators.mark_unbacked(x, 0)
        # A Python float argument specialises the kernel: one variant per threshold.
        return candidate(x, near_limit_threshold(x.dtype) or math.inf)

    _compiled = stats
    return stats


def finish_stats(raw: np.ndarray, numel: float) -> np.ndarray:
    """Host side: ``[absmax, l2, sum, nan, inf, near]`` -> ``TENSOR_STATS`` values."""
    absmax, l2, total, nan, inf, near = (float(v) for v in raw)
    n = max(numel, 1.0)
    return np.array([absmax, l2 / math.sqrt(n), total / n, nan, inf, near / n])


def combine_raw(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two raw stat vectors of calls of one module within a step."""
    return np.array(
        [
            max(a[0], b[0]),
            math.hypot(a[1], b[1]),
            a[2] + b[2],
            a[3] + b[3],
            a[4] + b[4],
            a[5] + b[5],
        ]
    )


def first_float_tensor(value) -> torch.Tensor | None:
    """The first floating-point tensor in a tensor, tuple/list, dict or ModelOutput."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        items = value.values() if isinstance(value, dict) else value.to_tuple()
        for item in items:
            found = first_float_tensor(item)
            if found is not None:
                return found
        return None
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_float_tensor(item)
            if found is not None:
                return found
    return None


def output_tensor(value) -> torch.Tensor | None:
    """The tensor that stands for a module's output: its first floating-point tensor,
    but never the ``loss`` of a ``ModelOutput`` / dict.

    A model (or a wrapper of one, like peft's) that returns its loss first would
    otherwise have its output judged by the loss, and a loss-only NaN (every label
    masked) would look like that module's forward making NaN.
    """
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        for key, item in value.items():
            if key == "loss":
                continue
            found = first_float_tensor(item)
            if found is not None:
                return found
        return None
    return first_float_tensor(value)
