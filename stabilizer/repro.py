"""``stabilizer replay BUNDLE``: rebuild a run from its repro bundle and re-run the step.

A bundle (``runs/<name>/repro/step-N/``, written by ``stabilizer train --trace``
at the first anomaly) holds the batch as safetensors, the pre-step state as a
checkpoint and the config and diagnosis as JSON: nothing here unpickles. This
module rebuilds the model with the training loop's own builders, which is why it
lives beside the loop and not in ``detector/`` (the detector never imports the loop).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stabilizer.checkpoint import list_checkpoints, load_checkpoint
from stabilizer.config import TrainConfig
from stabilizer.detector.detect import Detector, DetectorContext
from stabilizer.detector.policy import StateSnapshot
from stabilizer.detector.replay import (
    BATCH_FILE,
    RecordedStep,
    ReplayUnavailable,
    load_bundle,
    replay_step,
)
from stabilizer.precision import plan_precision
from stabilizer.probes.tracer import Tracer
from stabilizer.train import build_model, make_optimizer, resolve_device, train_step


def replay_bundle(path: Path, *, device: str = "cpu"):
    """Rebuild the model, load the pre-step state and batch, run the step traced.

    Returns the new diagnosis (or None if the step is clean here) after an op-level
    and fp32 replay, exactly as during training.
    """
    from safetensors.torch import load_file

    path = Path(path)
    data = load_bundle(path)
    cfg = TrainConfig.from_dict({**data["config"], "device": device}, source=str(path))
    torch_device = resolve_device(device)
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    _, model = build_model(cfg, plan, torch_device)
    optimizer = make_optimizer(model, cfg)
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        from stabilizer.errors import ConfigError

        raise ConfigError(f"{path}: the bundle has no checkpoint of the pre-step state")
    load_checkpoint(checkpoints[-1], model=model, optimizer=optimizer)
    tensors = load_file(str(path / BATCH_FILE))
    batches = []
    for i in range(int(data["micro_batches"])):
        prefix = f"{i}."
        batches.append(
            {
                k[len(prefix) :]: v.to(torch_device)
                for k, v in tensors.items()
                if k.startswith(prefix)
            }
        )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    tracer = Tracer(model, optimizer=optimizer, pattern=cfg.probe).attach()
    dtype = str(plan.autocast_dtype or plan.base_dtype).replace("torch.", "")
    detector = Detector(tracer, DetectorContext(compute_dtype=dtype, adam_eps=cfg.adam_eps))
    before = StateSnapshot(trainable, optimizer)
    before.capture()
    rng = torch.get_rng_state()
    step = int(data["step"])
    try:
        tracer.begin_step(step, full=True)
        loss, grad_norm = train_step(
            model,
            batches,
            optimizer=optimizer,
            scaler=None,
            plan=plan,
            trainable=trainable,
            max_grad_norm=cfg.max_grad_norm,
            before_update=tracer.measure_grads,
        )
        record = tracer.end_step(loss=loss, grad_norm=grad_norm)
        anomaly = detector.check(record)
        if anomaly is not None:
            recorded = RecordedStep.from_batches(
                batches, autocast_dtype=plan.autocast_dtype, grad_scale=None
            )
            try:
                result = replay_step(
                    model=model,
                    optimizer=optimizer,
                    before=before,
                    anomaly=anomaly,
                    tracer=tracer,
                    rng_state=rng,
                    recorded=recorded,
                )
            except ReplayUnavailable as why:
                anomaly.evidence["replay"] = f"not run: {why}"
            else:
                anomaly = detector.refine(anomaly, result.op)
        return anomaly, data["anomaly"]
    finally:
        tracer.close()
