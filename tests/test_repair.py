"""--on-anomaly repair: each repairable cause forced, fixed in place, and trained past;
the causes without a mechanical fix stop with the card."""

from __future__ import annotations

import math

import pytest
import torch
from faults import interrupt_at_batch, keep_model, overflow_cross_attention
from rich.console import Console
from torch import nn

import stabilizer
from stabilizer.config import TrainConfig
from stabilizer.store import TraceStore
from stabilizer.train import train


def quiet() -> Console:
    return Console(record=True, width=160, force_terminal=False)


# -- the classic run, repaired in stabilizer's own loop -------------------------------------


def test_the_classic_fp16_run_is_repaired_at_step_0_and_trains_to_the_end(tmp_path):
    cfg = TrainConfig.smoke(
        tmp_path / "run",
        adapter_dtype="fp16",
        trace=True,
        on_anomaly="repair",
        max_steps=6,
        save_every=None,
        max_eval_samples=4,
    )
    console = quiet()
    result = train(cfg, console=console)
    # Step 0 was redone after the repair: every logged loss is finite, none skipped.
    assert len(result.losses) == 6 and all(math.isfinite(x) for x in result.losses)
    assert result.nonfinite_steps == 0
    with TraceStore.open(result.run_dir / "trace.db") as store:
        rows = store.actions()
        actions = [(a["step"], a["action"]) for a in rows]
        statuses = list(store.steps()["status"])
    assert actions[:2] == [(0, "replay"), (0, "repair")]  # diagnosed, replayed, repaired
    # After it the loop scales its loss as --precision fp16 does: the only other actions
    # are the GradScaler finding its scale (it starts at 2**16 and halves on overflow).
    assert all(a["action"] == "skip" and "GradScaler skipped" in a["detail"] for a in rows[2:])
    # The redone step 0 replaced the failed attempt: each step is ok or a scaler skip.
    skipped = sorted({a["step"] for a in rows[2:]})
    assert [i for i, s in enumerate(statuses) if s != "ok"] == skipped
    assert set(statuses) <= {"ok", "skipped"} and statuses.count("ok") >= 3
    text = console.export_text()
    assert "upcast to fp32 from the pre-step state" in text and "float16 autocast" in text
    assert rows[1]["detail"].endswith("; a GradScaler now scales the loss")
    page = (result.run_dir / "report.html").read_text()
    assert "Repairs (1)" in page and "upcast to fp32" in page
    assert "Preflight (before step 0)" in page and "fp16 under AdamW" in page


# -- your own loop: a module that overflows fp16, a bad batch, and what cannot be fixed -----


class NormOverflow(nn.Module):
    """x + |1000 x| / 1000: finite in fp32, but (1000 x)^2 overflows fp16 inside it."""

    def forward(self, x):
        return x + (x * 1000).pow(2).sum(-1, keepdim=True).sqrt() / 1000


class LogFault(nn.Module):
    """log of a negative from step ``at`` on: NaN from finite inputs in any dtype."""

    def __init__(self, at: int | None = None) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        if self.at is not None and self.calls > self.at:
            return torch.log(x - 1e3)
        return x


class Net(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(8, 16)
        self.middle = middle
        self.head = nn.Linear(16, 1)

    def forward(self, x, labels=None):
        pred = self.head(self.middle(self.encoder(x))).squeeze(-1).float()
        loss = None if labels is None else (pred - labels.float()).pow(2).mean()
        return {"loss": loss, "logits": pred}


def batches(n: int, dtype=torch.float32, nan_at: int | None = None):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x = torch.randn(4, 8, generator=g).to(dtype)
        if i == nan_at:
            x[0, 0] = float("nan")
        yield x, torch.randn(4, generator=g)


def run(model, optimizer, tmp_path, data, **options):
    watch = stabilizer.watch(
        model,
        optimizer,
        on_anomaly="repair",
        console=quiet(),
        run_dir=tmp_path / "run",
        report=False,
        **options,
    )
    losses = []
    with watch:
        for x, y in data:
            loss = model(x, labels=y)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return watch, losses


def test_an_fp16_overflow_in_one_module_switches_that_module_to_fp32(tmp_path):
    model = Net(NormOverflow()).half()  # pure fp16, as after model.half()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)  # no Adam: no eps question
    watch, losses = run(model, optimizer, tmp_path, batches(5, torch.float16))
    [repair] = watch.session.summary.repairs if watch.session else watch.summary.repairs
    assert (repair["step"], repair["repair"], repair["module"]) == (0, "module-fp32", "middle")
    assert repair["cause"] in ("activation-overflow", "float-overflow")
    # Your loop cannot be rerun from outside: step 0's update is undone, the rest train.
    assert watch.skipped_steps == [] and all(math.isfinite(v) for v in losses[1:])
    assert len(watch.anomalies) == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert model.encoder.weight.dtype == torch.float16  # only the offender changed


def test_a_non_finite_batch_is_dropped_counted_and_training_goes_on(tmp_path):
    model = Net(nn.Identity())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch, losses = run(model, optimizer, tmp_path, batches(5, nan_at=2))
    summary = watch.summary
    assert summary.dropped_batches == [2]
    assert [r["repair"] for r in summary.repairs] == ["drop"]
    assert all(math.isfinite(v) for i, v in enumerate(losses) if i != 2)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_cause_without_a_mechanical_fix_stops_with_the_card(tmp_path):
    model = Net(LogFault(at=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(stabilizer.NumericalAnomalyError, match="no mechanical repair"):
        run(model, optimizer, tmp_path, batches(4))


class Fp32Overflow(nn.Module):
    """Overflows fp32 itself: running it in fp32 cannot help."""

    def forward(self, x):
        return x * 1e38 * 1e38


def test_a_repair_that_does_not_hold_stops_the_second_time(tmp_path):
    model = Net(Fp32Overflow())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(stabilizer.NumericalAnomalyError, match="came back after its repair"):
        run(model, optimizer, tmp_path, batches(4))


def test_max_repairs_is_validated_and_named():
    with pytest.raises(Exception, match="--max-repairs|max_repairs"):
        TrainConfig(max_repairs=0)


# -- stabilizer's loop: a Q-Former layer that overflows fp16, a learning rate that diverges --


def test_an_overflowing_qformer_layer_runs_in_fp32_and_the_run_finishes(tmp_path, monkeypatch):
    overflow_cross_attention(monkeypatch, scale=2000.0)  # nan-signatures.md reproduction 3
    cfg = TrainConfig.smoke(
        tmp_path / "run",
        precision="fp16",
        trace=True,
        on_anomaly="repair",
        max_steps=4,
        save_every=None,
        max_eval_samples=4,
    )
    result = train(cfg, console=quiet())
    (repair,) = result.trace.repairs
    assert (repair["step"], repair["cause"], repair["repair"]) == (
        0,
        "attention-overflow",
        "module-fp32",
    )
    assert repair["module"] == "Q-Former layer 0 cross-attention scores"
    # Step 0 was redone with the layer in fp32: every step trained on finite values.
    assert result.nonfinite_steps == 0 and all(math.isfinite(x) for x in result.losses)
    assert len(result.losses) == 4


def diverging(tmp_path, **overrides):
    return TrainConfig.smoke(
        tmp_path / "run",
        precision="fp16",
        lr=10.0,
        warmup_steps=0,
        trace=True,
        on_anomaly="repair",
        save_every=None,
        max_eval_samples=4,
        **overrides,
    )


def test_a_diverging_learning_rate_is_rolled_back_and_lowered_until_it_trains(
    tmp_path, monkeypatch
):
    kept = keep_model(monkeypatch)
    result = train(diverging(tmp_path, max_steps=12, max_repairs=10), console=quiet())
    rollbacks = [r for r in result.trace.repairs if r["repair"] == "rollback"]
    assert rollbacks and all(r["cause"] == "divergence-overflow" for r in rollbacks)
    # Each rollback halves the peak rate, and the repairs are in the run's summary.
    peaks = [float(r["detail"].rsplit("peak now ", 1)[1].rstrip(")")) for r in rollbacks]
    assert peaks == [10.0 * 0.5 ** (i + 1) for i in range(len(peaks))]
    assert len(result.losses) == 12
    trainable = [p for p in kept["model"].parameters() if p.requires_grad]
    assert all(bool(torch.isfinite(p).all()) for p in trainable)


def test_max_repairs_bounds_rollbacks_too(tmp_path):
    with pytest.raises(stabilizer.NumericalAnomalyError, match="1 repairs = --max-repairs"):
        train(diverging(tmp_path, max_steps=30, max_repairs=1), console=quiet())


def test_a_repaired_run_resumes_as_it_trained_after_the_repair(tmp_path, monkeypatch):
    def config(name):
        return TrainConfig.smoke(
            tmp_path / name,
            adapter_dtype="fp16",
            trace=True,
            on_anomaly="repair",
            max_steps=6,
            save_every=3,
            max_eval_samples=4,
        )

    straight = train(config("straight"), console=quiet())
    # Killed while it builds step 4's batch, after the step-3 checkpoint.
    interrupt_at_batch(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(config("killed"), console=quiet())
    monkeypatch.undo()
    console = quiet()
    resumed = train(config("killed"), resume=True, console=console)
    # No second repair: the checkpoint's fp32 adapters, Adam state and GradScaler state
    # load as they were, and the steps after it are the uninterrupted run's.
    assert "this run was repaired at step 0" in console.export_text()
    assert resumed.trace.repairs == [] and resumed.trace.anomalies == []
    assert resumed.losses == straight.losses[3:]
