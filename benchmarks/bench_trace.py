"""Cost of tracing: stabilizer's probes vs the untraced step, and the tools users reach for.

Modes, interleaved in one process on the same model and batch:

| mode            | what runs each step                                                     |
|-----------------|-------------------------------------------------------------------------|
| untraced        | stabilizer's training step, no hooks                                    |
| trace-full      | --trace with full statistics every step (trace_every=1) + the detector  |
| trace-full-compiled | as trace-full with --compile-stats (torch.compile fuses the stats)  |
| trace-check     | --trace with only the per-module NaN/Inf check (full stats never)       |
| watch-full      | ``stabilizer.watch`` left on around the same loop (a copy of the model), |
|                 | full statistics every step, with what a user gets by default: the trace |
|                 | store written every step and the pre-step snapshot for the replay       |
| watch-check     | as watch-full with full statistics on the first step only               |
| watch-check-late| as watch-check under ``on_anomaly="warn"``, each step judged at the end  |
|                 | of the next (``judge_late="on"``): no step ends waiting for the device   |
| debug-overflow  | transformers' DebugUnderflowOverflow on a copy of the model             |
| detect-anomaly  | torch.autograd.detect_anomaly() around forward and backward             |

    python benchmarks/bench_trace.py                                     # tiny preset, CPU
    python benchmarks/bench_trace.py --preset medium-instructblip-t5 --batch-size 4

No mode waits for the device after each step (a user's loop does not): a block of
steps is timed from one device sync to the next, so a mode whose step ends in a
host-device sync pays for it, as it does in training.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_loop import machine_description, save_result, time_block  # noqa: E402

import stabilizer  # noqa: E402
from stabilizer.config import TrainConfig  # noqa: E402
from stabilizer.data import load_samples  # noqa: E402
from stabilizer.detector.detect import Detector, DetectorContext  # noqa: E402
from stabilizer.models.lora import LoraSettings  # noqa: E402
from stabilizer.precision import plan_precision  # noqa: E402
from stabilizer.probes.tracer import Tracer  # noqa: E402
from stabilizer.train import build_model, make_encoder, make_optimizer, train_step  # noqa: E402

MODES = (
    "untraced",
    "trace-full",
    "trace-full-compiled",
    "trace-check",
    "watch-full",
    "watch-check",
    "watch-check-late",
    "debug-overflow",
    "detect-anomaly",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-instructblip-t5")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    modes = [m for m in args.modes.split(",") if m]
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

    def plain_step(m=model, opt=optimizer, ps=params):
        return train_step(
            m, [batch], optimizer=opt, scaler=None, plan=plan, trainable=ps, max_grad_norm=1.0
        )

    tracers: dict[str, Tracer] = {}
    counter = {"step": 0}

    def traced(kind: str):
        # Its own copy of the model, attached once for the whole benchmark as a traced
        # run is (attaching and removing the probes every step would time that too), so
        # its hooks never touch the other modes' steps.
        twin = copy.deepcopy(model)
        twin_params = [p for p in twin.parameters() if p.requires_grad]
        twin_opt = make_optimizer(twin, cfg)
        tracer = Tracer(
            twin,
            optimizer=twin_opt,
            trace_every=1 if kind.startswith("full") else 10**9,
            compile_stats=kind == "full-compiled",
        ).attach()
        detector = Detector(tracer, DetectorContext())
        tracers[kind] = tracer

        def run():
            counter["step"] += 1
            tracer.begin_step(counter["step"], full=kind.startswith("full"))
            loss, norm = train_step(
                twin,
                [batch],
                optimizer=twin_opt,
                scaler=None,
                plan=plan,
                trainable=twin_params,
                max_grad_norm=1.0,
                before_update=tracer.measure_grads,
            )
            record = tracer.end_step(loss=loss, grad_norm=norm)  # the step's one host sync
            detector.check(record)
            detector.warnings(record)

        return run

    watches = []
    scratch = tempfile.TemporaryDirectory(prefix="bench-watch-")

    def watched(kind: str):
        # Its own copy of the model, watched for the whole benchmark (the way a user
        # leaves it on), so its hooks never touch the other modes' steps.
        from rich.console import Console

        twin = copy.deepcopy(model)
        twin_params = [p for p in twin.parameters() if p.requires_grad]
        twin_opt = make_optimizer(twin, cfg)
        late = {"on_anomaly": "warn", "judge_late": "on"} if kind == "check-late" else {}
        watch = stabilizer.watch(
            twin,
            twin_opt,
            trace_every=1 if kind == "full" else 10**9,
            report=False,
            run_dir=Path(scratch.name) / kind,
            console=Console(quiet=True),
            **late,
        ).start()
        watches.append(watch)
        return lambda: plain_step(twin, twin_opt, twin_params)

    runners = {"untraced": lambda: plain_step()}
    for kind in ("full", "check", "check-late"):
        if f"watch-{kind}" in modes:
            runners[f"watch-{kind}"] = watched(kind)
    runners["trace-full"] = traced("full")
    if "trace-full-compiled" in modes:
        runners["trace-full-compiled"] = traced("full-compiled")
    runners["trace-check"] = traced("check")
    if "debug-overflow" in modes:
        from transformers.debug_utils import DebugUnderflowOverflow

        # Its hooks can never be removed, so it gets a copy of the model.
        twin = copy.deepcopy(model)
        twin_params = [p for p in twin.parameters() if p.requires_grad]
        twin_opt = make_optimizer(twin, cfg)
        DebugUnderflowOverflow(twin, max_frames_to_save=1)
        runners["debug-overflow"] = lambda: plain_step(twin, twin_opt, twin_params)

    def anomaly_mode():
        with torch.autograd.detect_anomaly(check_nan=True):
            plain_step()

    runners["detect-anomaly"] = anomaly_mode
    runners = {m: runners[m] for m in modes}
    failed: dict[str, str] = {}
    for mode, run in list(runners.items()):
        try:
            time_block(run, args.warmup, device)
        except Exception as exc:  # a baseline that cannot run on this model is a finding
            failed[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            del runners[mode]
            optimizer.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {m: [] for m in runners}
    order = list(runners)
    for round_ in range(args.rounds):
        # Each round starts one mode later, so no mode always follows the same other
        # (the slow baselines leave caches and the allocator in their own state).
        shift = round_ % len(order)
        for mode in order[shift:] + order[:shift]:
            times[mode].append(time_block(runners[mode], args.steps, device))
    base = times["untraced"]
    rows = []
    for mode in runners:
        ratios = [t / b for t, b in zip(times[mode], base, strict=True)]
        rows.append(
            {
                "mode": mode,
                "step_s": statistics.median(times[mode]),
                "ratio_to_untraced": statistics.median(ratios),
                "ratio_spread": [min(ratios), max(ratios)],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for mode, error in failed.items():
        rows.append({"mode": mode, "error": error})
        print(json.dumps(rows[-1]), flush=True)
    for watch in watches:
        watch.close()
    for each in tracers.values():
        each.close()
    scratch.cleanup()
    tracer = tracers["full"]
    result = {
        "benchmark": "trace",
        "command": "python benchmarks/bench_trace.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_description(device),
        "preset": args.preset,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "probed_modules": len(tracer.modules),
        "trainable_tensors": len(tracer.params),
        "steps_per_block": args.steps,
        "rounds": args.rounds,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
    }
    save_result(result, "trace", args, device)
    return result


if __name__ == "__main__":
    main()
