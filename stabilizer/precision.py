"""Precision modes: base-weight dtype, autocast, GradScaler, trainable dtype.

| --precision | base weights | compute             | GradScaler |
|-------------|--------------|---------------------|------------|
| fp32        | fp32         | fp32                | no         |
| bf16        | bf16         | bf16 autocast       | no         |
| fp16        | fp16         | fp16 autocast       | yes        |

Trainable tensors (LoRA, query tokens, projection) stay fp32 unless
``--adapter-dtype`` says otherwise. ``--adapter-dtype fp16`` reproduces the
classic failure report on purpose: everything fp16, no autocast, no GradScaler
(GradScaler refuses fp16 gradients), AdamW state in fp16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPlan:
    base_dtype: torch.dtype
    trainable_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool

    def autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler | None:
        if not self.use_grad_scaler:
            return None
        return torch.amp.GradScaler(device_type)


def plan_precision(precision: str, adapter_dtype: str) -> PrecisionPlan:
    """Resolve ``--precision`` and ``--adapter-dtype`` into what the loop does."""
    trainable = DTYPES[adapter_dtype]
    if adapter_dtype == "fp16":
        # As in the original report: a model loaded in fp16, wrapped by peft, then
        # cast with .half(), trained with plain AdamW and no scaler.
        return PrecisionPlan(torch.float16, torch.float16, None, False)
    if precision == "fp32":
        return PrecisionPlan(torch.float32, trainable, None, False)
    if precision == "bf16":
        return PrecisionPlan(torch.bfloat16, trainable, torch.bfloat16, False)
    return PrecisionPlan(torch.float16, trainable, torch.float16, trainable == torch.float32)
