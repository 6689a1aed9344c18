"""Peak memory of a training step, traced vs untraced, measured the same way in one process.

The torch profiler records every CPU tensor allocation and free (``profile_memory``);
the peak of its memory timeline over one step, less the bytes alive when the step
began (model, optimizer state, the batch), is the step's peak. On CUDA the
allocator's own peak (``max_memory_allocated``) is used instead. Modes alternate
on the same model and batch:

| mode        | the step                                                             |
|-------------|----------------------------------------------------------------------|
| untraced    | stabilizer's training step, no hooks                                 |
| watch-check | ``stabilizer.watch`` left on: the NaN/Inf check (and the snapshot)   |
| watch-full  | ``stabilizer.watch`` with full statistics every step                 |

Tracing keeps a pre-step snapshot of the trainable tensors and the optimizer state
(for the replay and for skip/rollback); that is reported apart from the step's
transient peak, since it is held all the time and scales with the adapter, not the
activations.

    python benchmarks/bench_memory.py                                    # tiny preset
    python benchmarks/bench_memory.py --preset medium-instructblip-t5 --batch-size 4
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
from stabilizer.train import build_model, make_encoder, make_optimizer, train_step  # noqa: E402


def cpu_peak_bytes(run) -> int:
    """Peak of live CPU tensor bytes during ``run()``, above those alive when it began.

    From the profiler's memory timeline (every allocation and free, by category), the
    only CPU-side account of tensor memory torch keeps."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        run()
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA; CPU has no other
        path = Path(scratch) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0


def peak_bytes(run, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(run)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-instructblip-t5")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    cfg = TrainConfig(
        model=args.preset, precision=args.precision, lora=LoraSettings(targets="all", rank=8)
    )
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    torch.manual_seed(0)
    loaded, model = build_model(cfg, plan, device)
    model.train()
    encoder = make_encoder(loaded, cfg)
    batch = encoder.train_batch(load_samples("easy-vqa", "train", limit=args.batch_size))
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg)
    from rich.console import Console

    def step():
        train_step(
            model,
            [batch],
            optimizer=optimizer,
            scaler=None,
            plan=plan,
            trainable=params,
            max_grad_norm=1.0,
        )

    peaks: dict[str, list[int]] = {"untraced": [], "watch-check": [], "watch-full": []}
    snapshot_bytes = 0
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        step()  # the optimizer state exists from here on, in every mode
        for _ in range(args.rounds):
            for mode in peaks:
                if mode == "untraced":
                    peaks[mode].append(peak_bytes(step, device))
                    continue
                watch = stabilizer.watch(
                    model,
                    optimizer,
                    trace_every=1 if mode == "watch-full" else 10**9,
                    report=False,
                    run_dir=Path(scratch) / mode,
                    console=Console(quiet=True),
                ).start()
                try:
                    step()  # the first step sizes the snapshot's buffers (held, not transient)
                    peaks[mode].append(peak_bytes(step, device))
                    if watch.session.needs_snapshot:
                        snapshot_bytes = watch.session.before.nbytes()
                finally:
                    watch.close()
    base = min(peaks["untraced"])
    rows = []
    for mode, values in peaks.items():
        peak = min(values)
        rows.append(
            {
                "mode": mode,
                "step_peak_mib": peak / 2**20,
                "ratio_to_untraced": peak / base if base else float("nan"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "memory",
        "command": "python benchmarks/bench_memory.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_description(device),
        "preset": args.preset,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "held_snapshot_mib": snapshot_bytes / 2**20,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
    }
    save_result(result, "memory", args, device)
    return result


if __name__ == "__main__":
    main()
