"""Turn a tensor into a few numbers without leaving the device.

Nothing here calls ``.item()`` or copies to the host: each function returns small
device tensors that the tracer stacks and copies once per step.
"""

from __future__ import annotations

import math

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


def tensor_stats(t: torch.Tensor) -> torch.Tensor:
    """``[absmax, l2, sum, nan, inf, near]`` as a float64 device tensor of 6.

    The definition of a full step's raw statistics, one tensor at a time; the tracer
    computes the same numbers for a whole pass at once (:mod:`stabilizer.probes.batched`).
    The L2 norm and the sum accumulate in float64: finite values past 1.8e19 (an
    exploding activation long before it is Inf) square past fp32's range, and an RMS
    read as Inf would look like an Inf the tensor does not hold.

    The host turns l2 and sum into RMS and mean with the element count it knows,
    so several calls of one module in one step combine exactly.
    """
    with torch.no_grad():  # not detach(): an op fewer, and invisible to autograd
        threshold = near_limit_threshold(t.dtype)
        x = t if t.dtype in _WIDE else t.float()
        wide = t.double()
        absmax = torch.linalg.vector_norm(x, ord=math.inf).double()
        l2 = torch.linalg.vector_norm(wide)
        total = wide.sum()
        nan = torch.isnan(x).sum(dtype=torch.float64)
        inf = torch.isinf(x).sum(dtype=torch.float64)
        near = (
            (x.abs() > threshold).sum(dtype=torch.float64)
            if threshold is not None
            else torch.zeros_like(nan)
        )
        return torch.stack([absmax, l2, total, nan, inf, near])


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
