"""What tracing adds to a training step, counted in aten ops and host syncs.

The count does not depend on the machine (each op is at least one kernel launch on
a GPU), so unlike a time it can be compared across runs and asserted in a test.
One batch, one model, ``stabilizer.watch`` around stabilizer's own training step:

| mode      | counted step                                                          |
|-----------|-----------------------------------------------------------------------|
| untraced  | no hooks                                                              |
| check     | ``watch(trace_every=10**9)``, a step after the first: NaN/Inf check only |
|           | (multi-tensor L1 norms: one op per pass, as on a GPU)                 |
| check-cpu | as check, the CPU way (L2 norms read on the host; a non-finite one re-checked) |
| full      | ``watch(trace_every=1)``: full statistics every step, reduced the way a |
|           | GPU does it (multi-tensor: a fixed number of ops per statistic)       |
| full-cpu  | as full, reduced the way a CPU does it (three single-pass ops per tensor:|
|           | on a CPU the cost is passes over memory, not launches)                |

    python benchmarks/bench_ops.py                                   # tiny preset
    python benchmarks/bench_ops.py --preset medium-instructblip-t5 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_loop import machine_description, save_result  # noqa: E402

import stabilizer  # noqa: E402
from stabilizer.config import TrainConfig  # noqa: E402
from stabilizer.data import load_samples  # noqa: E402
from stabilizer.models.lora import LoraSettings  # noqa: E402
from stabilizer.precision import plan_precision  # noqa: E402
from stabilizer.probes.batched import PassReducer  # noqa: E402
from stabilizer.probes.opcount import PHASES, OpCounter  # noqa: E402
from stabilizer.train import build_model, make_encoder, make_optimizer, train_step  # noqa: E402


def count_step(model, optimizer, batch, plan, *, trace_every: int | None, run_dir: Path):
    """Ops and syncs of the second step (the first may do one-off work) in one mode."""
    from rich.console import Console

    params = [p for p in model.parameters() if p.requires_grad]
    counter = OpCounter(optimizer)  # before the watch: its hooks must come first
    watch = None
    if trace_every is not None:
        watch = stabilizer.watch(
            model,
            optimizer,
            trace_every=trace_every,
            report=False,
            run_dir=run_dir,
            console=Console(quiet=True),
        ).start()
    try:
        for step in range(2):
            if step == 1:
                counter.reset()
                counter.__enter__()
            train_step(
                model,
                [batch],
                optimizer=optimizer,
                scaler=None,
                plan=plan,
                trainable=params,
                max_grad_norm=1.0,
            )
            if step == 1:
                counter.__exit__(None, None, None)
    finally:
        counter.remove()
        modules = len(watch.session.tracer.modules) if watch is not None else 0
        if watch is not None:
            watch.close()
    return counter, modules


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-instructblip-t5")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu")  # backward on CUDA runs in threads a dispatch mode misses
    cfg = TrainConfig(
        model=args.preset, precision=args.precision, lora=LoraSettings(targets="all", rank=8)
    )
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    torch.manual_seed(0)
    loaded, model = build_model(cfg, plan, device)
    model.train()
    encoder = make_encoder(loaded, cfg)
    batch = encoder.train_batch(load_samples("easy-vqa", "train", limit=args.batch_size))
    optimizer = make_optimizer(model, cfg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as scratch:
        base, _ = count_step(model, optimizer, batch, plan, trace_every=None, run_dir=Path(scratch))
        for mode, every, strategy in (
            ("check", 10**9, "multi-tensor"),
            ("check-cpu", 10**9, "per-tensor"),
            ("full", 1, "multi-tensor"),
            ("full-cpu", 1, "per-tensor"),
        ):
            PassReducer.strategy = strategy
            try:
                counter, modules = count_step(
                    model, optimizer, batch, plan, trace_every=every, run_dir=Path(scratch) / mode
                )
            finally:
                PassReducer.strategy = "auto"
            extra = {p: counter.by_phase[p] - base.by_phase[p] for p in PHASES}
            rows.append(
                {
                    "mode": mode,
                    "strategy": strategy,
                    "probed_modules": modules,
                    "untraced_ops": base.total,
                    "traced_ops": counter.total,
                    "extra_ops": counter.total - base.total,
                    "extra_ops_per_module": (counter.total - base.total) / max(modules, 1),
                    "extra_by_phase": extra,
                    "syncs_by_phase": {p: counter.syncs[p] - base.syncs[p] for p in PHASES},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "ops",
        "command": "python benchmarks/bench_ops.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_description(device),
        "preset": args.preset,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
    }
    save_result(result, "ops", args, device)
    return result


if __name__ == "__main__":
    main()
