"""Overhead of the pytest plugin: the same test run with and without ``--nan-guard``.

The test trains the tiny preset for a few steps; each mode runs in its own pytest
process, alternating, and the ratio of the test's own duration is reported.

    python benchmarks/bench_plugin.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

TEST = """
import time, torch
from stabilizer.config import TrainConfig
from stabilizer.precision import plan_precision
from stabilizer.train import build_model, make_encoder, make_optimizer, train_step
from stabilizer.data import load_samples

def test_train_steps():
    cfg = TrainConfig()
    plan = plan_precision("fp32", "fp32")
    loaded, model = build_model(cfg, plan, torch.device("cpu"))
    model.train()
    batch = make_encoder(loaded, cfg).train_batch(load_samples("easy-vqa", "train", limit=32))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, cfg)
    train_step(model, [batch], optimizer=opt, scaler=None, plan=plan, trainable=params,
               max_grad_norm=1.0)
    start = time.perf_counter()
    for _ in range(STEPS):
        train_step(model, [batch], optimizer=opt, scaler=None, plan=plan, trainable=params,
                   max_grad_norm=1.0)
    print("STEP_SECONDS", (time.perf_counter() - start) / STEPS)
"""


def run(folder: Path, args: list[str]) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(next(line.split()[1] for line in out.splitlines() if "STEP_SECONDS" in line))


def main() -> None:
    steps, rounds = 10, 7  # a median of 7 alternating pairs: one noisy process moves it little
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_bench.py").write_text(TEST.replace("STEPS", str(steps)))
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(rounds):
            times["off"].append(run(folder, []))
            times["on"].append(run(folder, ["--nan-guard"]))
    ratios = [on / off for on, off in zip(times["on"], times["off"], strict=True)]
    result = {
        "benchmark": "plugin",
        "command": "python benchmarks/bench_plugin.py",
        "date": time.strftime("%Y-%m-%d"),
        "steps": steps,
        "rounds": rounds,
        "off_step_s": statistics.median(times["off"]),
        "on_step_s": statistics.median(times["on"]),
        "ratio": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
    }
    print(json.dumps(result))
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "plugin-tiny-instructblip-t5-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.path.insert(0, str(ROOT))
    from report import write_report

    write_report(out, ROOT.parent / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
