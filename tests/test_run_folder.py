"""The run folder under kills, resumes, two processes and a full disk: nothing lost,
nothing written twice, nothing outside runs/, and a clear message for each refusal.

Kills are real: a child process SIGKILLs itself at a chosen point (right after a chosen
checkpoint is written, or when a chosen step's batch is built), as `kill -9 <pid>`
would, and the run is then resumed here.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_train import quick_config, quiet

import stabilizer.train as train_module
from stabilizer.cli import main
from stabilizer.errors import ConfigError, StabilizerError
from stabilizer.rundir import RunInUseError, RunLock, read_metrics
from stabilizer.train import train

ROOT = Path(__file__).resolve().parent.parent

KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import stabilizer.train as train_module
from stabilizer.data.collate import BatchEncoder
from test_train import quick_config, quiet

cfg = quick_config(Path({tmp!r}), **{overrides!r})
kill_after_checkpoint, kill_at_batch = {after_checkpoint!r}, {at_batch!r}
real_save, real_batch = train_module.save_checkpoint, BatchEncoder.train_batch
calls = {{"n": 0}}

def save_checkpoint(run_dir, step, **kwargs):
    out = real_save(run_dir, step, **kwargs)
    if step == kill_after_checkpoint:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

def train_batch(self, samples, **kwargs):
    if kwargs.get("pixel_values") is None:
        if calls["n"] == kill_at_batch:
            os.kill(os.getpid(), signal.SIGKILL)
        calls["n"] += 1
    return real_batch(self, samples, **kwargs)

train_module.save_checkpoint = save_checkpoint
BatchEncoder.train_batch = train_batch
train_module.train(cfg, console=quiet())
"""


def run_killed(tmp_path, *, after_checkpoint=None, at_batch=None, **overrides) -> None:
    """Train in a child process that SIGKILLs itself at the chosen point."""
    script = KILLED_CHILD.format(
        tests=str(ROOT / "tests"),
        tmp=str(tmp_path),
        overrides=overrides,
        after_checkpoint=after_checkpoint,
        at_batch=at_batch,
    )
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]


# -- metrics.jsonl survives kill -9 ---------------------------------------------------------


def test_kill_after_a_checkpoint_loses_no_metrics_of_the_steps_it_holds(tmp_path):
    overrides = {"max_steps": 30, "save_every": 5, "log_every": 10, "max_eval_samples": 4}
    # Killed right after step 25's checkpoint: steps 20-24 were not due for logging yet.
    run_killed(tmp_path, after_checkpoint=25, **overrides)
    assert train_steps(tmp_path / "run") == list(range(25))
    resumed = train(quick_config(tmp_path, **overrides), resume=True, console=quiet())
    assert resumed.start_step == 25
    assert train_steps(tmp_path / "run") == list(range(30))  # each step once


def test_resume_drops_the_metrics_it_writes_again(tmp_path):
    overrides = {"max_steps": 30, "save_every": 10, "log_every": 5, "max_eval_samples": 4}
    # Killed while building step 26's batch: steps 20-24 are logged, the checkpoint is 20.
    run_killed(tmp_path, at_batch=26, **overrides)
    assert train_steps(tmp_path / "run") == list(range(25))
    straight = train(quick_config(tmp_path / "s", **overrides), console=quiet())
    train(quick_config(tmp_path, **overrides), resume=True, console=quiet())
    assert train_steps(tmp_path / "run") == list(range(30))  # 20-24 once, not twice
    logged = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"}
    assert [logged[i] for i in range(30)] == straight.losses  # and bit-exact


# -- --resume --max-steps -------------------------------------------------------------------


def lrs(run_dir) -> list[float]:
    return [r["lr"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_extending_a_finished_run_rebuilds_the_schedule_and_says_so(tmp_path):
    base = {"save_every": 10, "max_eval_samples": 4, "warmup_steps": 2}
    train(quick_config(tmp_path, max_steps=20, **base), console=quiet())
    console = quiet()
    train(quick_config(tmp_path, max_steps=40, **base), resume=True, console=console)
    text = " ".join(console.export_text().split())
    assert "planned for 20 steps and now runs 40" in text
    assert "differs from an uninterrupted 40-step run" in text
    straight = train(quick_config(tmp_path / "s", max_steps=40, **base), console=quiet())
    extended = lrs(tmp_path / "run")
    # Step 20 no longer runs at the old cosine's 0, then jumps: it follows the new one.
    assert extended[20] > 0
    assert extended[20:] == pytest.approx(lrs(straight.run_dir)[20:], rel=1e-6)


def test_resume_with_max_steps_below_the_checkpoint_is_refused(tmp_path):
    train(quick_config(tmp_path, max_steps=6, save_every=3, max_eval_samples=4), console=quiet())
    with pytest.raises(ConfigError, match=r"--max-steps 2: the checkpoint step-00000006 is"):
        train(quick_config(tmp_path, max_steps=2, max_eval_samples=4), resume=True, console=quiet())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == (
        "step-00000006"
    )


# -- one process per run folder ------------------------------------------------------------


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    cfg = quick_config(tmp_path, max_steps=2, max_eval_samples=4)
    lock = RunLock(cfg.run_dir).acquire()
    try:
        with pytest.raises(RunInUseError, match=rf"pid {os.getpid()} on "):
            train(cfg, console=quiet())
    finally:
        lock.release()
    train(cfg, console=quiet())  # free again


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_run(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from stabilizer.rundir import RunLock; "
            f"lock = RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunInUseError, match=f"pid {holder.pid} on"):
        RunLock(run_dir).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run_dir / ".lock").exists()  # the stale file stays; its lock went with the process
    RunLock(run_dir).acquire().release()


# -- a disk that fills up --------------------------------------------------------------------


def test_a_full_disk_names_the_folder_and_the_intact_checkpoint(tmp_path, monkeypatch):
    real = train_module.save_checkpoint

    def save_checkpoint(run_dir, step, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(run_dir, step, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)
    cfg = quick_config(tmp_path, max_steps=8, save_every=3, max_eval_samples=4)
    with pytest.raises(StabilizerError) as info:
        train(cfg, console=quiet())
    message = str(info.value)
    assert f"the disk holding {cfg.run_dir} is full" in message
    assert "step-00000003, is intact" in message and "--resume" in message
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    resumed = train(cfg, resume=True, console=quiet())  # and it does continue
    assert resumed.start_step == 3 and train_steps(cfg.run_dir) == list(range(8))


# -- the command line: names, refusals and what to do ------------------------------------------

QUICK = ["--max-steps", "2", "--max-train-samples", "8", "--max-eval-samples", "4",
         "--batch-size", "4", "--real-images-only"]  # fmt: skip


def cli(*args, cwd: Path):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, ["train", *QUICK, *args])
    finally:
        os.chdir(old)


@pytest.mark.parametrize("name", ["../../etc", "/tmp/anywhere", "a/b", "..", "latest"])
def test_a_run_name_never_leaves_runs(tmp_path, name):
    result = cli("--run-name", name, cwd=tmp_path)
    assert result.exit_code == 2, result.output
    assert "a run name is one folder name under runs/" in " ".join(result.output.split())
    assert "--run-dir" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_max_grad_norm_has_one_rule(tmp_path):
    for value in ("0", "-1"):
        result = cli("--max-grad-norm", value, "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "--max-grad-norm must be positive" in text and "--max-grad-norm none" in text


def test_a_failed_start_says_what_to_do_and_keeps_latest(tmp_path):
    assert cli("--run-name", "good", cwd=tmp_path).exit_code == 0
    assert os.readlink(tmp_path / "runs" / "latest") == "good"
    # A start that fails in setup (its data folder does not exist) after writing config.json.
    failed = cli("--run-name", "broken", "--dataset", str(tmp_path / "nope"), cwd=tmp_path)
    assert failed.exit_code == 2
    assert os.readlink(tmp_path / "runs" / "latest") == "good"  # not taken over
    # Starting it again: not "pass --resume" (there is nothing to resume) but what works.
    (tmp_path / "runs" / "broken").mkdir(exist_ok=True)
    (tmp_path / "runs" / "broken" / "config.json").write_text(
        json.dumps(json.loads((tmp_path / "runs" / "good" / "config.json").read_text()))
    )
    again = cli("--run-name", "broken", cwd=tmp_path)
    text = " ".join(again.output.split())
    assert again.exit_code == 2 and "stopped before its first checkpoint" in text
    assert "--overwrite" in text and "--resume to continue" not in text
    resumed = CliRunner().invoke(
        main, ["train", "--resume", "--run-dir", str(tmp_path / "runs" / "broken")]
    )
    assert "start it afresh with --overwrite" in " ".join(resumed.output.split())
    fresh = cli("--run-name", "broken", "--overwrite", cwd=tmp_path)
    assert fresh.exit_code == 0, fresh.output
    assert os.readlink(tmp_path / "runs" / "latest") == "broken"


def test_a_folder_with_a_checkpoint_offers_resume_and_overwrite(tmp_path):
    assert cli("--run-name", "done", cwd=tmp_path).exit_code == 0
    again = cli("--run-name", "done", cwd=tmp_path)
    text = " ".join(again.output.split())
    assert again.exit_code == 2 and "last checkpoint: step-00000002" in text
    assert "--resume" in text and "--overwrite" in text
    both = cli("--run-name", "done", "--resume", "--overwrite", cwd=tmp_path)
    assert "pass one" in both.output


def test_no_message_gives_a_cli_user_a_python_call(tmp_path):
    assert cli("--run-name", "done", cwd=tmp_path).exit_code == 0
    run = tmp_path / "runs" / "done"
    result = CliRunner().invoke(
        main, ["eval", str(run), "--checkpoint", str(run / "checkpoints" / "step-00000009")]
    )
    assert result.exit_code != 0
    assert "(run_dir)" not in result.output and "Traceback" not in result.output
    assert "step-* folders in its checkpoints/ folder" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", "x", "field 'lr' must be a number, got 'x'"),
        ("max_steps", 1.5, "field 'max_steps' must be a whole number or null, got 1.5"),
        ("trace", "yes", "field 'trace' must be true/false, got 'yes'"),
        ("lora", "x", "field 'lora' must be an object"),
    ],
)
def test_a_tampered_config_json_names_the_field(tmp_path, field, value, message):
    assert cli("--run-name", "done", cwd=tmp_path).exit_code == 0
    config = tmp_path / "runs" / "done" / "config.json"
    data = json.loads(config.read_text())
    data[field] = value
    config.write_text(json.dumps(data))
    for args in (
        ["eval", str(config.parent)],
        ["train", "--resume", "--run-dir", str(config.parent)],
    ):
        result = CliRunner().invoke(main, args)
        text = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert f"{config}: {message}" in text and "Traceback" not in result.output
