"""The example scripts the README tells users to run, run for real (short)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.store import TraceStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_example_traces_the_run_and_writes_the_report(tmp_path):
    example = load_example("trainer_callback")
    callback = example.main(["--output-dir", str(tmp_path), "--steps", "4"])
    assert callback.report_path == tmp_path / "stabilizer" / "report.html"
    assert callback.report_path.is_file()
    with TraceStore.open(tmp_path / "stabilizer" / "trace.db") as store:
        assert list(store.steps()["status"]) == ["ok"] * 4
        assert store.meta()["source"] == "transformers.Trainer"
        assert len(store.modules()) > 100  # the Q-Former preset of probes


def test_trainer_example_classic_failure_is_the_fp16_adam_0_over_0_at_step_0(tmp_path):
    example = load_example("trainer_callback")
    with pytest.raises(NumericalAnomalyError) as stopped:
        example.main(["--output-dir", str(tmp_path), "--steps", "3", "--classic-failure"])
    anomaly = stopped.value.anomaly
    assert (anomaly.step, anomaly.pass_, anomaly.cause) == (0, "optimizer", "fp16-adam-eps")
    assert anomaly.card().startswith("NaN/Inf at step 0, optimizer pass in Q-Former")
    assert anomaly.evidence["gradients finite"] is True
    assert anomaly.op is not None  # Trainer's step replayed op by op
    assert (tmp_path / "stabilizer" / "report.html").is_file()


def test_own_loop_example_trains_silently_and_writes_the_report(tmp_path):
    example = load_example("own_loop")
    watch = example.main(["--run-dir", str(tmp_path / "run"), "--steps", "3"])
    assert watch.anomalies == [] and watch.steps == 3
    assert watch.report_path == tmp_path / "run" / "report.html"
    with TraceStore.open(tmp_path / "run" / "trace.db") as store:
        assert store.meta()["source"] == "stabilizer.watch"
        assert len(store.modules()) > 100  # the Q-Former preset of probes


def test_own_loop_example_classic_failure_names_fp16_adam_eps_at_step_0(tmp_path):
    example = load_example("own_loop")
    with pytest.raises(NumericalAnomalyError) as stopped:
        example.main(["--run-dir", str(tmp_path / "run"), "--steps", "3", "--classic-failure"])
    anomaly = stopped.value.anomaly
    assert (anomaly.step, anomaly.pass_, anomaly.cause) == (0, "optimizer", "fp16-adam-eps")
    assert anomaly.op is not None  # replayed from the gradients the optimizer stepped on
    assert (tmp_path / "run" / "report.html").is_file()
