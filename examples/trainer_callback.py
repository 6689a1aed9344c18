"""LoRA on the Q-Former with ``transformers.Trainer``, traced by stabilizer's callback.

Offline and on CPU: the tiny InstructBLIP preset (built from config) on easy-vqa.

    python examples/trainer_callback.py                          # healthy, 40 steps
    python examples/trainer_callback.py --classic-failure        # fp16 adapters: NaN at step 0
    stabilizer report runs/trainer-demo/stabilizer               # the report, again

Everything stabilizer-specific is the one ``StabilizerCallback(...)`` line; the rest
is an ordinary Trainer script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import Trainer, TrainingArguments

from stabilizer.data import load_samples
from stabilizer.integrations import StabilizerCallback
from stabilizer.models.loading import load_model
from stabilizer.models.lora import LoraSettings, apply_lora
from stabilizer.train import make_encoder


def main(argv: list[str] | None = None) -> StabilizerCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/trainer-demo"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--on-anomaly", default="raise", help="raise, skip, clip, rollback, warn")
    parser.add_argument(
        "--classic-failure",
        action="store_true",
        help="cast the LoRA model to fp16 after get_peft_model (adapters and AdamW state fp16)",
    )
    parser.add_argument(
        "--optim",
        default="adamw_torch",
        help="Trainer's optimizer; adamw_torch_fused hides the 0/0 of fp16 AdamW and fails "
        "a few steps later instead (stabilizer calls it fp16-adam-underflow)",
    )
    args = parser.parse_args(argv)

    loaded = load_model("tiny-instructblip-t5", seed=0)
    model = apply_lora(loaded.model, LoraSettings(targets="attention", rank=4), adapter_dtype=None)
    if args.classic_failure:
        model.half()
    from stabilizer.config import TrainConfig

    encoder = make_encoder(loaded, TrainConfig())
    samples = load_samples("easy-vqa", "train", limit=512)

    # The preflight names the classic failure before step 0 and would stop there;
    # "warn" lets this example go on and show the detector catch it in step 0 too.
    preflight = "warn" if args.classic_failure else "stop"
    callback = StabilizerCallback(on_anomaly=args.on_anomaly, preflight=preflight)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.output_dir),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=1e-3,
            warmup_steps=5,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,  # the collator turns samples into model inputs
            optim=args.optim,
        ),
        train_dataset=samples,
        data_collator=encoder.train_batch,
        callbacks=[callback],
    )
    trainer.train()
    return callback


if __name__ == "__main__":
    main()
