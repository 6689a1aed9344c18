"""Overhead of the pytest plugin on a suite of model tests: tests/guarded_suite (tiny
transformers/peft models: LoRA training with and without gradient checkpointing, SDPA
vs eager, fp16/bf16, generate, meta device, sparse gradients), run with no guard,
``--nan-guard`` and ``--nan-guard --nan-guard-ops``.

Each mode is its own pytest process, the modes alternate round by round, and the
child processes' CPU time (user + sys, from ``getrusage``) and pytest's own session
time are reported, with the outcomes (a mode that changes them has false failures).

    python benchmarks/bench_plugin_suite.py
"""

from __future__ import annotations

import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SUITE = ROOT.parent / "tests" / "guarded_suite" / "suite_models.py"
MODES = {
    "off": [],
    "--nan-guard": ["--nan-guard"],
    "--nan-guard --nan-guard-ops": ["--nan-guard", "--nan-guard-ops"],
}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str]) -> tuple[float, float, str]:
    """(CPU seconds, pytest's session seconds, the outcome line) of one suite run."""
    before = children_cpu()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            str(SUITE),
            *args,
        ],
        cwd=SUITE.parent,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    cpu = children_cpu() - before
    last = out.strip().splitlines()[-1]
    session = float(re.search(r" in ([0-9.]+)s", last).group(1))
    outcome = re.sub(r",? [0-9]+ warnings?", "", last.split(" in ")[0]).strip("= ")
    return cpu, session, outcome


def main() -> None:
    rounds = 3
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    session: dict[str, list[float]] = {m: [] for m in MODES}
    outcomes: dict[str, set[str]] = {m: set() for m in MODES}
    for _ in range(rounds):
        for mode, args in MODES.items():
            c, s, o = run(args)
            cpu[mode].append(c)
            session[mode].append(s)
            outcomes[mode].add(o)
    rows = []
    for mode in MODES:
        rows.append(
            {
                "mode": mode,
                "cpu_s": statistics.median(cpu[mode]),
                "session_s": statistics.median(session[mode]),
                "cpu_ratio": statistics.median(
                    [a / b for a, b in zip(cpu[mode], cpu["off"], strict=True)]
                ),
                "session_ratio": statistics.median(
                    [a / b for a, b in zip(session[mode], session["off"], strict=True)]
                ),
                "outcomes": sorted(outcomes[mode]),
            }
        )
    result = {
        "benchmark": "plugin-suite",
        "command": "python benchmarks/bench_plugin_suite.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} cores",
        "rounds": rounds,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "plugin-suite-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    if "--no-report" not in sys.argv:
        sys.path.insert(0, str(ROOT))
        from report import write_report

        write_report(out, ROOT.parent / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
