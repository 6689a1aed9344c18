"""W&B runs of traced runs, offline only, read back with wandb's own reader of the
run's transaction log (``wandb leet inspect --json``).

One real tiny run writes TensorBoard events and a W&B run side by side (a NaN batch on
a check-only step, skipped): both must hold the same scalars. Nothing leaves the
machine: WANDB_MODE=offline, and every wandb folder is in the test's tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import nan_pixels_at
from test_tensorboard import points, read_events, scalar_tags, traced_run
from test_watch import Regressor, batches, plain_loop

from stabilizer.config import TrainConfig
from stabilizer.errors import ConfigError
from stabilizer.reports.wandb_sink import export_wandb
from stabilizer.store import TraceStore

TEXT_KEYS = {"anomaly/diagnosis", "action/taken", "train/status"}


def offline_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Offline W&B, silent, with every folder it may write to under ``root``."""
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        mp.setenv(name, str(root / name.lower()))


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> Path:
    """A NaN pixel in step 1's batch, skipped; TensorBoard and W&B written live."""
    root = tmp_path_factory.mktemp("wandb")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, root)
        nan_pixels_at(mp, 1)
        traced_run(run_dir, on_anomaly="skip", replay=False, tensorboard=True, wandb=True)
    return run_dir


# ---------------------------------------------------------------------- reading runs


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def inspect(folder: Path, *extra: str) -> str:
    """``wandb leet inspect`` of one run folder: wandb's reader of its ``run-*.wandb`` log."""
    [log] = folder.glob("run-*.wandb")
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", str(log), "--json", *extra]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def history(folder: Path) -> dict[int, dict]:
    """The logged rows by step (``_``-keys, W&B's own, left out)."""
    rows = {}
    for line in inspect(folder).splitlines():
        record = json.loads(line)
        if record["type"] == "history":
            item = record["history"]["item"]
            step = int(record["history"]["step"]["num"])
            rows[step] = {k: v for k, v in item.items() if not k.startswith("_")}
    return rows


def run_summary(folder: Path) -> dict:
    return json.loads(inspect(folder, "--summary"))


def wandb_points(rows: dict[int, dict], key: str) -> list[tuple[int, float]]:
    # NaN and Inf come back as the strings "NaN", "Infinity": float() reads both.
    return [(step, float(row[key])) for step, row in sorted(rows.items()) if key in row]


# ---------------------------------------------------------------------- tests


def test_live_run_logs_the_tensorboard_scalars_and_the_anomaly(both):
    [folder] = offline_runs(both)
    rows = history(folder)
    tb = read_events(both / "tensorboard" / "rank0")

    scalar_keys = set().union(*rows.values()) - TEXT_KEYS
    assert scalar_keys == scalar_tags(tb)
    families = {key.split("/")[0] for key in scalar_keys}
    assert {"activation_absmax", "lora_update_ratio", "attention_score_max"} <= families
    for tag in scalar_keys:
        got, want = wandb_points(rows, tag), points(tb, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        # TensorBoard stores float32, W&B the float64 the sink computed.
        np.testing.assert_array_equal(
            np.float32([v for _, v in got]), np.float32([v for _, v in want]), err_msg=tag
        )
    assert np.isnan(dict(wandb_points(rows, "train/loss"))[1])

    with TraceStore.open(both / "trace.db") as store:
        [anomaly], [action] = store.anomalies(), store.actions()
    card = rows[1]["anomaly/diagnosis"]
    assert "anomaly 1 at step 1, input pass" in card
    assert f"- cause: {anomaly['cause']}" in card and anomaly["cause"] == "nonfinite-input"
    assert "- first offender: none named" in card
    assert f"- fix: {anomaly['fix']}" in card
    assert rows[1]["action/taken"] == f"{action['action']} at step 1: {action['detail']}"
    assert "skipped" in rows[1]["train/status"]
    assert [s for s, row in rows.items() if TEXT_KEYS & set(row)] == [1]

    summary = run_summary(folder)
    assert summary["state"] == "finished" and summary["project"] == "stabilizer"
    assert summary["name"] == "run-rank0"
    assert summary["config"]["max_steps"] == 4 and summary["config"]["wandb"] is True
    first = summary["summary"]
    assert first["anomaly/first_cause"] == "nonfinite-input"
    assert first["anomaly/first_module"] == "none named"
    assert first["anomaly/first_step"] == 1


def test_report_command_exports_an_offline_run_equal_to_the_live_one(both, tmp_path):
    from click.testing import CliRunner

    from stabilizer.cli import main

    [live] = offline_runs(both)
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, tmp_path)
        result = CliRunner().invoke(main, ["report", str(both), "--wandb"])
    assert result.exit_code == 0, result.output
    [exported] = [f for f in offline_runs(both) if f != live]
    assert f"wrote W&B run {exported}" in result.output

    got, want = history(exported), history(live)
    assert sorted(got) == sorted(want) == [0, 1, 2, 3]
    for step in want:
        assert got[step].keys() == want[step].keys(), step
        for key, value in want[step].items():
            assert got[step][key] == value, (step, key)
    assert run_summary(exported)["summary"]["anomaly/first_step"] == 1


def test_without_wandb_the_error_names_the_option_and_the_install(both, monkeypatch):
    # None in sys.modules makes ``import wandb`` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "wandb", None)
    before = offline_runs(both)
    with pytest.raises(ConfigError) as err:
        export_wandb(both, option="stabilizer report --wandb")
    message = str(err.value)
    assert message.startswith("stabilizer report --wandb logs the trace to Weights & Biases")
    assert message.endswith("Install the extra with: pip install 'stabilizer[wandb]'")
    assert offline_runs(both) == before


def test_wandb_without_trace_is_refused_naming_both_options(tmp_path):
    with pytest.raises(ConfigError, match="--wandb.*--trace"):
        TrainConfig.smoke(tmp_path / "run", wandb=True)


def test_your_own_loop_logs_to_wandb_too(tmp_path, monkeypatch):
    """watch(..., wandb=True): the same sink under the own-loop face."""
    offline_env(monkeypatch, tmp_path)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    watch = plain_loop(
        model,
        optimizer,
        batches(4),
        fault_at=2,
        run_dir=tmp_path / "own",
        on_anomaly="skip",
        wandb=True,
    )
    assert [a.cause for a in watch.anomalies] == ["forward-math"]
    [folder] = offline_runs(tmp_path / "own")
    rows = history(folder)
    assert sorted(rows) == [0, 1, 2, 3]
    assert "forward-math" in rows[2]["anomaly/diagnosis"] and "skip" in rows[2]["action/taken"]


def test_the_trainer_callback_logs_to_wandb_too(tmp_path, monkeypatch):
    """StabilizerCallback(wandb=True): the same sink under the Trainer face."""
    from test_integrations import NaNAt, TinyRegressor, make_trainer
    from test_integrations import quiet as quiet_console

    from stabilizer.integrations import StabilizerCallback

    offline_env(monkeypatch, tmp_path)
    model = TinyRegressor()
    fault = NaNAt(model, "encoder.2", step=2)
    callback = StabilizerCallback(on_anomaly="skip", wandb=True, console=quiet_console())
    make_trainer(tmp_path, model, [fault, callback], steps=4).train()
    fault.handle.remove()
    [folder] = offline_runs(tmp_path / "out" / "stabilizer")
    rows = history(folder)
    assert sorted(rows) == [0, 1, 2, 3]
    assert "encoder.2" in rows[2]["anomaly/diagnosis"] and "skip" in rows[2]["action/taken"]
