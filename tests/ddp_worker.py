"""Entry point the distributed tests start under torchrun: ``stabilizer`` plus an optional fault.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py \
        train --trace ...

``STABILIZER_TEST_FAULT=RANK:STEP:MODULE`` writes a NaN into the output of MODULE (a
path inside the peft model, e.g. ``base_model.model.qformer.encoder.layer.0...``) on
rank RANK only, in the forward pass of optimizer step STEP (grad_accum 1). Everything
else is the real command line.
"""

from __future__ import annotations

import math
import os

import torch

import stabilizer.train as train_module
from stabilizer.cli import main


def plant_fault(spec: str) -> None:
    rank, step, module_path = spec.split(":", 2)
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    real = train_module.build_model

    def build_model(cfg, plan, device):
        loaded, model = real(cfg, plan, device)
        calls = {"n": 0}

        def poison(module, args, output):
            if not torch.is_grad_enabled():  # evaluation, not a training step
                return output
            calls["n"] += 1
            if calls["n"] - 1 != int(step):
                return output
            tensor = output[0] if isinstance(output, tuple) else output
            tensor = tensor.clone()
            tensor.view(-1)[0] = math.nan
            return (tensor, *output[1:]) if isinstance(output, tuple) else tensor

        model.get_submodule(module_path).register_forward_hook(poison)
        return loaded, model

    train_module.build_model = build_model


if __name__ == "__main__":
    fault = os.environ.get("STABILIZER_TEST_FAULT")
    if fault:
        plant_fault(fault)
    main()
