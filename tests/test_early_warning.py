"""Early warning, measured: for the slow-burn faults the warning comes at least one step
before the first NaN/Inf, the NaN's card says how far ahead it was predicted, and a
healthy traced run raises no warning at all.

Each fault runs in stabilizer's own loop on the tiny InstructBLIP preset, deterministic
(fixed seeds, fixed data order, faults planted by step count, not by time).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from faults import grow_cross_attention, keep_model
from test_train import quick_config, quiet

from stabilizer.detector.diagnosis import CAUSES
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.store import TraceStore
from stabilizer.train import train

WARNING_CAUSES = {"near-overflow", "divergence", "update-too-large", "fp16-adam-underflow"}


def run_until_nan(cfg):
    """Train until the detector stops the run; (the anomaly, the warnings stored before it)."""
    with pytest.raises(NumericalAnomalyError) as info:
        train(cfg, console=quiet())
    with TraceStore.open(cfg.run_dir / "trace.db") as store:
        rows = store.anomalies()
    warnings = [r for r in rows if r["cause"] in WARNING_CAUSES]
    return info.value.anomaly, warnings


def lead_of(anomaly) -> int:
    """The lead time the card reports ("..., N step(s) ahead")."""
    return int(re.search(r"(\d+) step\(s\) ahead$", anomaly.evidence["predicted by"]).group(1))


# -- fp16 Adam state with eps 1e-6: no 0/0 at step 0, but g*g flushes to 0 -----------------


def fp16_adam(tmp_path, **overrides):
    return quick_config(
        tmp_path,
        adapter_dtype="fp16",
        adam_eps=1e-6,  # above fp16's smallest subnormal: step 0 is finite
        trace=True,
        max_steps=12,
        save_every=None,
        **overrides,
    )


def test_fp16_adam_underflow_is_warned_at_step_0_before_the_overflow_it_causes(tmp_path):
    anomaly, warnings = run_until_nan(fp16_adam(tmp_path, preflight="off"))
    first = warnings[0]
    assert (first["step"], first["pass"], first["cause"]) == (0, "optimizer", "fp16-adam-underflow")
    assert anomaly.step >= 1  # the warning came at least one step before the NaN/Inf
    # The overflow is named as the update's consequence, with the update's fix.
    assert anomaly.cause == "fp16-adam-overflow" and not anomaly.warning
    assert anomaly.fix == CAUSES["fp16-adam-underflow"].fix
    assert anomaly.evidence["unstable update"].startswith("step 0: ")
    assert anomaly.evidence["predicted by"].startswith("the warning of step 0 (fp16-adam-underflow")
    assert lead_of(anomaly) == anomaly.step


def test_the_preflight_predicts_the_fp16_adam_overflow_before_step_0(tmp_path):
    cfg = fp16_adam(tmp_path, preflight="warn")
    anomaly, _ = run_until_nan(cfg)
    preflight = json.loads((cfg.run_dir / "preflight.json").read_text())
    assert "fp16-adam-underflow" in [f["cause"] for f in preflight["findings"]]
    assert anomaly.cause == "fp16-adam-overflow"
    assert anomaly.evidence["predicted by"] == (
        f"the preflight, before step 0 (fp16-adam-underflow), {anomaly.step + 1} step(s) ahead"
    )


def test_repair_goes_back_to_before_the_unstable_update_and_trains_on(tmp_path, monkeypatch):
    kept = keep_model(monkeypatch)
    cfg = fp16_adam(tmp_path, preflight="warn", on_anomaly="repair")
    result = train(cfg, console=quiet())
    assert result.nonfinite_steps == 0 and len(result.losses) == cfg.max_steps
    (repair,) = result.trace.repairs
    assert (repair["cause"], repair["repair"]) == ("fp16-adam-overflow", "upcast")
    # Not the pre-step state of the NaN's step: its weights had already jumped.
    assert "upcast to fp32 from the state before step 0's update" in repair["detail"]
    trainable = [p for p in kept["model"].parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(torch.isfinite(p).all() for p in trainable)


# -- attention logits that grow every step (fp16 compute) ------------------------------------


def test_growing_attention_scores_are_predicted_steps_before_they_overflow(tmp_path, monkeypatch):
    grow_cross_attention(monkeypatch, rate=1.25)  # q and k x1.25 a step: q·k x1.5625
    cfg = quick_config(tmp_path, precision="fp16", trace=True, max_steps=60, save_every=None)
    anomaly, warnings = run_until_nan(cfg)
    assert (anomaly.pass_, anomaly.cause) == ("forward", "attention-overflow")
    assert anomaly.module == "Q-Former layer 0 cross-attention scores"
    (warning,) = [w for w in warnings if w["cause"] == "near-overflow"]
    lead = anomaly.step - warning["step"]
    assert lead >= 1
    # Predicted from the growth, not only from "half the limit" (which gives one step).
    assert lead >= 3
    assert warning["evidence"]["growth per step"].startswith("x1.5")
    assert abs(warning["evidence"]["steps to the limit at this growth"] - lead) <= 1
    assert anomaly.evidence["predicted by"] == (
        f"the warning of step {warning['step']} (near-overflow, "
        f"Q-Former layer 0 cross-attention scores), {lead} step(s) ahead"
    )


def test_steady_attention_scores_raise_no_warning(tmp_path, monkeypatch):
    grow_cross_attention(monkeypatch, rate=1.0)  # the same fault path, no growth
    cfg = quick_config(tmp_path, precision="fp16", trace=True, max_steps=30, save_every=None)
    result = train(cfg, console=quiet())
    assert result.trace.warnings == [] and result.trace.anomalies == []


# -- a learning rate that diverges ------------------------------------------------------------


def test_a_diverging_learning_rate_is_warned_before_the_overflow(tmp_path):
    cfg = quick_config(
        tmp_path,
        precision="fp16",
        lr=10.0,
        warmup_steps=0,
        trace=True,
        max_steps=30,
        save_every=None,
    )
    anomaly, warnings = run_until_nan(cfg)
    first = warnings[0]
    assert first["cause"] == "update-too-large"
    assert anomaly.step - first["step"] >= 1
    # The Inf is the divergence's, whichever module's backward shows it first.
    assert anomaly.cause == "divergence-overflow"
    assert anomaly.evidence["predicted by"].startswith(
        f"the warning of step {first['step']} (update-too-large"
    )
    assert lead_of(anomaly) == anomaly.step - first["step"]


# -- a healthy run -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_healthy_traced_run_raises_no_warning(tmp_path, precision):
    cfg = quick_config(
        tmp_path,
        precision=precision,
        trace=True,
        on_anomaly="warn",
        max_steps=80,
        save_every=None,
    )
    result = train(cfg, console=quiet())
    assert result.trace.warnings == [] and result.trace.anomalies == []
    assert result.losses[-1] < result.losses[0]  # and it learned
