"""Your own training loop under ``stabilizer.watch``: LoRA on InstructBLIP's Q-Former.

    python examples/own_loop.py                       # healthy: trains, writes the report
    python examples/own_loop.py --classic-failure     # fp16 adapters: stops in step 0, named
    python examples/own_loop.py --precision bf16      # autocast, seen by the hooks

A plain PyTorch loop, the kind people write: nothing in it knows about stabilizer
except the one ``with`` line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import stabilizer
from stabilizer.config import TrainConfig
from stabilizer.data import load_samples
from stabilizer.models.loading import load_model
from stabilizer.models.lora import LoraSettings, apply_lora
from stabilizer.train import make_encoder


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/own-loop"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--classic-failure",
        action="store_true",
        help="cast the LoRA model to fp16 after get_peft_model (adapters and AdamW state fp16)",
    )
    args = parser.parse_args(argv)

    loaded = load_model("tiny-instructblip-t5", seed=0)
    model = apply_lora(loaded.model, LoraSettings(targets="attention", rank=4), adapter_dtype=None)
    if args.classic_failure:
        model.half()  # the original report's mistake
    encoder = make_encoder(loaded, TrainConfig())
    samples = load_samples("easy-vqa", "train", limit=16 * args.steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    # The preflight names the classic failure before step 0 and would stop there;
    # "warn" lets this example go on and show the detector catch it in step 0 too.
    preflight = "warn" if args.classic_failure else "stop"
    with stabilizer.watch(model, optimizer, run_dir=args.run_dir, preflight=preflight) as watch:
        for step in range(args.steps):
            batch = encoder.train_batch(samples[16 * step : 16 * (step + 1)])
            if args.classic_failure:
                batch["pixel_values"] = batch["pixel_values"].half()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if step % 5 == 0:
                print(f"step {step}: loss {loss.item():.4f}")  # a sync the user chose
    return watch


if __name__ == "__main__":
    try:
        main()
    except stabilizer.NumericalAnomalyError as err:
        raise SystemExit(f"stopped: {err.anomaly.headline()} ({err.anomaly.cause})") from None
