"""Run by tests under torchrun: a Trainer with StabilizerCallback, NaN planted on one rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/trainer_ddp_worker.py OUTPUT_DIR FAULT_RANK FAULT_STEP
"""

from __future__ import annotations

import os
import sys

from test_integrations import NaNAt, Points, TinyRegressor
from transformers import Trainer, TrainingArguments

from stabilizer.integrations import StabilizerCallback

if __name__ == "__main__":
    output_dir, fault_rank, fault_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = TinyRegressor()
    callbacks = [StabilizerCallback(on_anomaly="skip")]
    if int(os.environ["RANK"]) == fault_rank:
        callbacks.insert(0, NaNAt(model, "encoder.2", fault_step))
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        ddp_backend="gloo",
    )
    Trainer(model=model, args=args, train_dataset=Points(64), callbacks=callbacks).train()
