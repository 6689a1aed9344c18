"""Fault injection for detector tests: small modules that fail in one known place and
helpers that plant a fault in the training loop (the tiny InstructBLIP presets).

Every fault is deterministic: constant weights and inputs for the plain modules,
fixed seeds and data order for the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

import stabilizer
import stabilizer.train as train_module
from stabilizer.data.collate import BatchEncoder
from stabilizer.detector.detect import Detector, DetectorContext
from stabilizer.detector.diagnosis import Anomaly
from stabilizer.probes.tracer import StepRecord, Tracer

CROSS_SCORES = "qformer.encoder.layer.0.crossattention.attention"


# -- plain modules ---------------------------------------------------------------------------


class Net(nn.Module):
    """``embed -> relu -> hidden -> relu -> head`` with constant weights and no bias.

    With ``x = ones(2, 4)``: embed gives 0.1 * 4 = 0.4 per unit, hidden gives
    ``8 * 0.4 * hidden_weight`` per unit, head ``8 * hidden_out * head_weight``.
    """

    def __init__(
        self, hidden_weight: float = 0.1, head_weight: float = 0.1, dtype=torch.float32
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8, bias=False)
        self.hidden = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            self.embed.weight.fill_(0.1)
            self.hidden.weight.fill_(hidden_weight)
            self.head.weight.fill_(head_weight)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.embed(x)))))


def ones(dtype=torch.float32) -> torch.Tensor:
    return torch.ones(2, 4, dtype=dtype)


class ShiftedLog(nn.Module):
    """``log(x - shift)``: NaN from finite inputs whenever ``x < shift`` (invalid math)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x - self.shift)


class NaNBackward(torch.autograd.Function):
    """Identity in forward; its backward returns NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


class BadBackward(nn.Module):
    """A finite forward (``x * scale``) whose own backward makes NaN."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NaNBackward.apply(x * self.scale)


class InplaceGain(nn.Module):
    """Multiplies its input in place by ``gain`` and returns it (like ReLU(inplace=True))."""

    def __init__(self, gain: float, width: int = 8, dtype=torch.float32) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((width,), gain, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gain)


# -- one traced step -------------------------------------------------------------------------


@dataclass
class Traced:
    record: StepRecord
    anomaly: Anomaly | None
    tracer: Tracer
    detector: Detector
    warnings: list[Anomaly] = field(default_factory=list)

    def index(self, name: str) -> int:
        return next(m.index for m in self.tracer.modules if m.name == name)


def traced_step(
    model: nn.Module,
    x: torch.Tensor,
    *,
    loss_fn=None,
    optimizer: torch.optim.Optimizer | None = None,
    context: DetectorContext | None = None,
    extra: dict | None = None,
    full: bool = True,
    pattern: str | None = None,
) -> Traced:
    """Forward, backward, optimizer step and check, under ``stabilizer.trace``."""
    loss_fn = loss_fn or (lambda out: out.float().mean())  # small gradients, even in fp16
    with stabilizer.trace(model, optimizer=optimizer, pattern=pattern) as tracer:
        detector = Detector(tracer, context)
        tracer.begin_step(0, full=full)
        loss = loss_fn(model(x))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        record = tracer.end_step(loss=loss, extra=extra)
        anomaly = detector.check(record)
        warnings = detector.warnings(record)
    return Traced(record, anomaly, tracer, detector, warnings)


# -- faults in the training loop ----------------------------------------------------------


def overflow_cross_attention(monkeypatch, scale: float) -> None:
    """nan-signatures.md reproduction 3: eager attention, layer-0 cross-attention
    query and key weights times ``scale`` (weights stay finite in fp16)."""
    real = train_module.load_model

    def load_model(name, **kwargs):
        loaded = real(name, attn_implementation="eager", **kwargs)
        attention = loaded.model.qformer.encoder.layer[0].crossattention.attention
        with torch.no_grad():
            attention.query.weight.mul_(scale)
            attention.key.weight.mul_(scale)
        return loaded

    monkeypatch.setattr(train_module, "load_model", load_model)


def grow_cross_attention(monkeypatch, rate: float) -> None:
    """Eager attention whose layer-0 cross-attention query and key weights are multiplied
    by ``rate`` after every optimizer step: the scores grow by rate**2 a step (a slow
    burn, as attention logits that grow through training). Counted in optimizer steps,
    so the detector's replay (which reruns a forward) does not grow them again."""
    real_load, real_optimizer = train_module.load_model, train_module.make_optimizer

    def load_model(name, **kwargs):
        return real_load(name, attn_implementation="eager", **kwargs)

    def make_optimizer(model, cfg):
        optimizer = real_optimizer(model, cfg)
        attention = model.get_submodule("base_model.model." + CROSS_SCORES)

        def grow(*_):
            with torch.no_grad():
                for part in (attention.query, attention.key):
                    getattr(part, "base_layer", part).weight.mul_(rate)

        optimizer.register_step_post_hook(grow)
        return optimizer

    monkeypatch.setattr(train_module, "load_model", load_model)
    monkeypatch.setattr(train_module, "make_optimizer", make_optimizer)


def nan_pixels_at(monkeypatch, step: int) -> None:
    """The training batch of optimizer step ``step`` (grad_accum 1) gets a NaN pixel."""
    real = BatchEncoder.train_batch
    calls = {"n": 0}

    def train_batch(self, samples, **kwargs):
        batch = real(self, samples, **kwargs)
        if kwargs.get("pixel_values") is None:  # training batches, not the label checks
            if calls["n"] == step:
                batch["pixel_values"] = batch["pixel_values"].clone()
                batch["pixel_values"][0, 0, 0, 0] = math.nan
            calls["n"] += 1
        return batch

    monkeypatch.setattr(BatchEncoder, "train_batch", train_batch)


def interrupt_at_batch(monkeypatch, call: int) -> None:
    """A KeyboardInterrupt (a Ctrl-C, or a kill the loop cannot see coming) while the
    training loop builds its ``call``-th training batch (1-based); undo with
    ``monkeypatch.undo()`` before resuming."""
    real = BatchEncoder.train_batch
    calls = {"n": 0}

    def train_batch(self, samples, **kwargs):
        if kwargs.get("pixel_values") is None:  # training batches, not the label checks
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt("simulated kill")
        return real(self, samples, **kwargs)

    monkeypatch.setattr(BatchEncoder, "train_batch", train_batch)


def keep_model(monkeypatch) -> dict:
    """Keep the model the loop builds (and a copy of its trainable tensors at build time)."""
    real = train_module.build_model
    kept: dict = {}

    def build_model(cfg, plan, device):
        loaded, model = real(cfg, plan, device)
        kept["model"] = model
        kept["initial"] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        return loaded, model

    monkeypatch.setattr(train_module, "build_model", build_model)
    return kept
