"""Rebuild a trained model from its run folder, for ``stabilizer eval`` and ``predict``.

>>> restored = restore_run(Path("runs/latest"))
>>> restored.checkpoint.name
'step-00002500'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stabilizer.checkpoint import find_latest_checkpoint, load_trainable_weights
from stabilizer.config import TrainConfig
from stabilizer.data.collate import BatchEncoder
from stabilizer.errors import CheckpointError
from stabilizer.models.loading import LoadedModel
from stabilizer.precision import PrecisionPlan, plan_precision
from stabilizer.rundir import load_run_config


@dataclass
class RestoredRun:
    cfg: TrainConfig
    loaded: LoadedModel
    model: torch.nn.Module
    encoder: BatchEncoder
    plan: PrecisionPlan
    device: torch.device
    checkpoint: Path


def restore_run(
    run_dir: Path, *, checkpoint: Path | None = None, device: str | None = None
) -> RestoredRun:
    """Load the run's config, rebuild base model + LoRA, and load the checkpoint's weights."""
    from stabilizer.train import build_model, make_encoder, resolve_device

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else find_latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"{run_dir} has no complete checkpoint yet (checkpoints/step-*/); train longer "
            "or pass --checkpoint"
        )
    torch_device = resolve_device(device or cfg.device)
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    loaded, model = build_model(cfg, plan, torch_device)
    load_trainable_weights(ckpt, model)
    model.eval()
    return RestoredRun(cfg, loaded, model, make_encoder(loaded, cfg), plan, torch_device, ckpt)
