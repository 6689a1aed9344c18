"""The run folder ``runs/<name>/``: resolved config, metrics, checkpoints, eval summary.

runs/<name>/
  config.json        the resolved TrainConfig (what `--resume`, eval and predict read)
  metrics.jsonl      one JSON object per logged step and per evaluation, appended
  eval.json          the final evaluation (real / blank / shuffled images, baseline)
  checkpoints/       step-00000500/ ... (see stabilizer.checkpoint)
runs/latest          a link to the newest run
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from stabilizer.config import TrainConfig
from stabilizer.errors import ConfigError, StabilizerError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two trainings of one folder are not caught
    fcntl = None

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"


def choose_run_dir(cfg: TrainConfig, *, root: Path = Path("runs")) -> Path:
    """``--run-dir`` if given, else ``runs/<run-name or timestamp-model>``."""
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + "-" + Path(cfg.model).name
    return root / name


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temp file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


LOCK_FILE = ".lock"


class RunInUseError(StabilizerError):
    """Another live training process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder for the life of one training process.

    ``flock`` on ``<run>/.lock``: the kernel releases it when the process dies, so a
    killed run (kill -9 included) never blocks the next; the file names the holder
    (pid, host, start time) for the error the second process gets.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> RunLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunInUseError(
                f"{self.path.parent} is in use by a training process that is still running "
                f"({holder}); wait for it to finish, or stop it, before starting or resuming "
                "this run (one process per run folder: two would interleave metrics.jsonl "
                "and delete each other's checkpoints)"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def prepare_run_dir(
    run_dir: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool = False
) -> None:
    """Create the folder and write the config; refuse to mix two runs in one folder.
    The caller holds the folder's :class:`RunLock`."""
    config_path = run_dir / CONFIG_FILE
    if config_path.exists() and not resume:
        if overwrite:
            _clear_run_dir(run_dir)
        else:
            raise ConfigError(_holds_a_run(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_path, cfg.to_dict())


def _holds_a_run(run_dir: Path) -> str:
    from stabilizer.checkpoint import find_latest_checkpoint

    checkpoint = find_latest_checkpoint(run_dir)
    if checkpoint is None:
        return (
            f"{run_dir} holds a run that stopped before its first checkpoint (nothing to "
            "resume): pass --overwrite to start it afresh (its files are deleted), or "
            "choose another --run-name / --run-dir"
        )
    return (
        f"{run_dir} already holds a run (last checkpoint: {checkpoint.name}). Pass --resume "
        "to continue it, --overwrite to start afresh (its files are deleted), or choose "
        "another --run-name / --run-dir"
    )


def _clear_run_dir(run_dir: Path) -> None:
    """--overwrite: delete a previous run's files (the lock we hold stays)."""
    for child in run_dir.iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def point_latest(run_dir: Path) -> None:
    """``runs/latest`` -> this run. Called once the run has started (model, data and
    preflight ready): a start that fails never takes ``latest`` over."""
    _point_latest(run_dir)


def _point_latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    try:
        if link.is_symlink() or link.exists():
            if not link.is_symlink():
                return  # a real folder named "latest": leave it alone
            link.unlink()
        link.symlink_to(run_dir.name)
    except OSError:
        pass  # links are a convenience; some filesystems do not have them


def truncate_metrics(run_dir: Path, start_step: int, total_steps: int) -> int:
    """Resume from the checkpoint of ``start_step``: drop the metrics.jsonl lines the
    resumed run writes again (train steps from ``start_step`` on, evaluations after
    it, a line cut by a crash). Atomic. Returns how many lines were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        step = record.get("step")
        redone = isinstance(step, int) and (
            (record.get("kind") == "train" and step >= start_step)
            or (record.get("kind") == "eval" and (step > start_step or step >= total_steps))
        )
        if redone:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def is_disk_full(exc: BaseException) -> bool:
    """No space (or quota) left: the OS's errno, or SQLite's own words for it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def disk_full_error(run_dir: Path, last_checkpoint: Path | None) -> StabilizerError:
    intact = (
        f"the last complete checkpoint, {last_checkpoint}, is intact: free some space and "
        f"`stabilizer train --resume --run-dir {run_dir}` continues from it"
        if last_checkpoint is not None
        else "no checkpoint was complete yet: free some space and start the run again "
        "with --overwrite"
    )
    return StabilizerError(f"the disk holding {run_dir} is full; {intact}")


def load_run_config(run_dir: Path) -> TrainConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    return TrainConfig.load(run_dir / CONFIG_FILE)


class MetricsLog:
    """Appends one JSON line per record and flushes, so a crash loses at most one line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the readable log
    return records


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
