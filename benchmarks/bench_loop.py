"""Step time and peak memory of stabilizer's training step vs a plain transformers+peft loop.

Both loops train the same LoRA-wrapped model on the same pre-encoded easy-vqa
batches (already on the device), each with its own AdamW. Timing alternates
blocks of steps between the loops in one process, so machine noise hits both
alike; the ratio reported is the median of the per-round ratios.

    python benchmarks/bench_loop.py                              # tiny preset on CPU
    python benchmarks/bench_loop.py --preset medium-instructblip-t5 --batch-sizes 4
    python benchmarks/bench_loop.py --preset instructblip-flan-t5-xl-random \\
        --precision bf16 --batch-sizes 8,16,24 --device cuda     # the GPU part

Results are written as JSON under benchmarks/results/ and BENCHMARKS.md is
regenerated from every result file there (see benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from stabilizer.config import TrainConfig  # noqa: E402
from stabilizer.data import load_samples  # noqa: E402
from stabilizer.models.lora import LoraSettings  # noqa: E402
from stabilizer.precision import plan_precision  # noqa: E402
from stabilizer.train import (  # noqa: E402
    build_model,
    make_encoder,
    make_optimizer,
    make_schedule,
    train_step,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cores = torch.get_num_threads()
    return f"{platform.machine()} CPU, {cores} threads (torch {torch.__version__})"


def plain_step(model, batch, optimizer, scheduler, params, plan, device) -> None:
    """What a user writes with transformers + peft and nothing else."""
    with plan.autocast(device.type):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def time_block(fn, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)  # deliberate: the block's time includes all queued device work
    return (time.perf_counter() - start) / steps


def bench_batch_size(args, cfg, plan, device, loaded, model, encoder, samples, batch_size):
    batch = encoder.train_batch(samples[:batch_size])
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    ours_opt, plain_opt = make_optimizer(model, cfg), make_optimizer(model, cfg)
    ours_sched = make_schedule(ours_opt, cfg, 10**6)
    plain_sched = make_schedule(plain_opt, cfg, 10**6)
    scaler = plan.grad_scaler(device.type)

    def ours():
        train_step(
            model,
            [batch],
            optimizer=ours_opt,
            scaler=scaler,
            plan=plan,
            trainable=params,
            max_grad_norm=1.0,
        )
        ours_sched.step()

    def plain():
        plain_step(model, batch, plain_opt, plain_sched, params, plan, device)

    modes = {"plain": plain, "ours": ours}
    for fn in modes.values():  # warm-up: allocator, kernels, optimizer state
        time_block(fn, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {name: [] for name in modes}
    peaks: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(time_block(fn, args.steps, device))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                peaks[name] = max(peaks.get(name, 0.0), peak)
    ratios = [o / p for o, p in zip(times["ours"], times["plain"], strict=True)]
    row = {
        "batch_size": batch_size,
        "plain_step_s": statistics.median(times["plain"]),
        "ours_step_s": statistics.median(times["ours"]),
        "ratio_ours_to_plain": statistics.median(ratios),
        "ratio_spread": [min(ratios), max(ratios)],
    }
    if peaks:
        row["peak_gib"] = peaks
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-instructblip-t5")
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    cfg = TrainConfig(
        model=args.preset,
        precision=args.precision,
        lora=LoraSettings(targets="all", rank=8),
        device=device.type,
    )
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    torch.manual_seed(0)
    built = time.perf_counter()
    loaded, model = build_model(cfg, plan, device)
    build_s = time.perf_counter() - built
    model.train()
    encoder = make_encoder(loaded, cfg)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    samples = load_samples("easy-vqa", "train", limit=max(sizes))
    rows = []
    for batch_size in sizes:
        try:
            rows.append(
                bench_batch_size(
                    args, cfg, plan, device, loaded, model, encoder, samples, batch_size
                )
            )
        except torch.OutOfMemoryError as err:
            rows.append(
                {"batch_size": batch_size, "error": f"out of memory: {err}".splitlines()[0]}
            )
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "loop",
        "command": "python benchmarks/bench_loop.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_description(device),
        "preset": args.preset,
        "precision": args.precision,
        "lora": "all Q-Former Linear layers, r=8, + query_tokens + language_projection",
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "build_s": build_s,
        "steps_per_block": args.steps,
        "rounds": args.rounds,
        "rows": rows,
        "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "date": time.strftime("%Y-%m-%d"),
    }
    save_result(result, "loop", args, device)
    return result


def save_result(result: dict, kind: str, args, device: torch.device) -> Path:
    """``results/<kind>-<preset>-<precision>-<device>[-tag].json``, then BENCHMARKS.md."""
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = args.out / f"{kind}-{args.preset}-{args.precision}-{device.type}{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_report:
        sys.path.insert(0, str(ROOT))
        from report import write_report

        write_report(args.out, ROOT.parent / "BENCHMARKS.md")
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
