"""The run folder ``runs/<name>/``: resolved config, metrics, checkpoints, eval summary.

runs/<name>/
  config.json        the resolved TrainConfig (what `--resume`, eval and predict read)
  metrics.jsonl      one JSON object per logged step and per evaluation, appended
  eval.json          the final evaluation (real / blank / shuffled images, baseline)
  checkpoints/       step-00000500/ ... (see stabilizer.checkpoint)
runs/latest          a link to the newest run
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from stabilizer.config import TrainConfig
from stabilizer.errors import ConfigError

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


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, *, resume: bool) -> None:
    """Create the folder and write the config; refuse to mix two runs in one folder."""
    config_path = run_dir / CONFIG_FILE
    if config_path.exists() and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run. Pass --resume to continue it, or choose "
            "another --run-dir / --run-name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_path, cfg.to_dict())
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
