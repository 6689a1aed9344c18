"""Cost of tracing under DDP: the traced step with the per-step rank verdict vs the plain step.

Two ranks (gloo on CPU, nccl on GPUs) started with torch.multiprocessing; each
builds the preset with LoRA, wraps it in DDP and times, interleaved on the same
batches:

| mode      | what runs each step                                                      |
|-----------|--------------------------------------------------------------------------|
| untraced  | stabilizer's training step through DDP                                   |
| traced    | the same under a TraceSession (probes, detector, store, and the one      |
|           | host-side verdict collective per step that keeps the ranks in agreement)  |

and, alone, the verdict collective itself (``RankGroup.agree``) over many calls.

    python benchmarks/bench_ddp.py                         # tiny preset, 2 CPU ranks
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_loop import machine_description, save_result, time_block  # noqa: E402

from stabilizer.config import TraceSettings, TrainConfig  # noqa: E402
from stabilizer.data import load_samples  # noqa: E402
from stabilizer.distributed import RankGroup, RankVerdict  # noqa: E402
from stabilizer.models.lora import LoraSettings  # noqa: E402
from stabilizer.precision import plan_precision  # noqa: E402
from stabilizer.train import (  # noqa: E402
    build_model,
    make_encoder,
    make_optimizer,
    train_step,
    wrap_ddp,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1"
    )
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    ranks = RankGroup.start(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    from rich.console import Console

    from stabilizer.detector.session import TraceSession

    cfg = TrainConfig(
        model=args.preset, precision=args.precision, lora=LoraSettings(targets="all", rank=8)
    )
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    torch.manual_seed(0)
    loaded, model = build_model(cfg, plan, device)
    ddp = wrap_ddp(model, device, ranks)
    ddp.train()
    encoder = make_encoder(loaded, cfg)
    samples = load_samples("easy-vqa", "train", limit=args.batch_size * world)
    mine = samples[rank * args.batch_size : (rank + 1) * args.batch_size]
    batch = {k: v.to(device) for k, v in encoder.train_batch(mine).items()}
    optimizer = make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def untraced() -> None:
        train_step(
            ddp, [batch], optimizer=optimizer, scaler=None, plan=plan,
            trainable=trainable, max_grad_norm=1.0,
        )  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        session = TraceSession(
            model=model,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
            trainable=trainable,
            settings=TraceSettings(on_anomaly="raise", replay=False, adam_eps=cfg.adam_eps),
            run_dir=Path(tmp),
            console=Console(quiet=True),
            compute_dtype=str(plan.autocast_dtype or plan.base_dtype).replace("torch.", ""),
            uses_grad_scaler=False,
            ranks=ranks,
        )
        session.tracer.close()  # attached only inside the traced block
        step = {"n": 0}

        def traced() -> None:
            session.begin_step(step["n"])
            loss, norm = train_step(
                ddp, [batch], optimizer=optimizer, scaler=None, plan=plan,
                trainable=trainable, max_grad_norm=1.0, before_update=session.before_update,
            )  # fmt: skip
            session.end_step(step["n"], loss, norm, [batch], 1e-3)
            step["n"] += 1

        def traced_block(steps: int) -> float:
            session.tracer.attach()
            try:
                return time_block(traced, steps, device)
            finally:
                session.tracer.close()

        time_block(untraced, args.warmup, device)
        traced_block(args.warmup)
        times = {"untraced": [], "traced": []}
        for _ in range(args.rounds):
            ranks.barrier()
            times["untraced"].append(time_block(untraced, args.steps, device))
            ranks.barrier()
            times["traced"].append(traced_block(args.steps))
        session.close()

    verdict = RankVerdict(rank=rank, anomalous=False)
    ranks.barrier()
    started = time.perf_counter()
    for _ in range(args.agree_calls):
        ranks.agree(verdict)
    agree_s = (time.perf_counter() - started) / args.agree_calls
    if rank == 0:
        ratios = [t / u for t, u in zip(times["traced"], times["untraced"], strict=True)]
        queue.put(
            {
                "untraced_step_s": statistics.median(times["untraced"]),
                "traced_step_s": statistics.median(times["traced"]),
                "ratio": statistics.median(ratios),
                "ratio_spread": [min(ratios), max(ratios)],
                "agree_s": agree_s,
                "agree_share_of_step": agree_s / statistics.median(times["untraced"]),
                "modules": len(session.tracer.modules),
                "device": str(device),
            }
        )
    ranks.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-instructblip-t5")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--agree-calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        rank_main, args=(args.world, _free_port(), args, queue), nprocs=args.world,
        join=True, start_method="spawn",
    )  # fmt: skip
    row = queue.get()
    device = torch.device(row["device"].split(":")[0])
    result = {
        "benchmark": "ddp",
        "preset": args.preset,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "world": args.world,
        "machine": machine_description(device),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/bench_ddp.py " + " ".join(argv or sys.argv[1:]),
        "rounds": args.rounds,
        "steps_per_block": args.steps,
        **row,
    }
    print(
        f"{args.world} ranks, {args.preset}, batch {args.batch_size}/rank: untraced "
        f"{row['untraced_step_s'] * 1000:.1f} ms, traced {row['traced_step_s'] * 1000:.1f} ms "
        f"({row['ratio']:.2f}x); verdict collective {row['agree_s'] * 1e6:.0f} us "
        f"({row['agree_share_of_step'] * 100:.2f}% of a step)"
    )
    save_result(result, "ddp", args, device)
    return result


if __name__ == "__main__":
    main()
