"""The training loop: LoRA on the Q-Former, readable top to bottom.

    >>> from stabilizer.config import TraceSettings, TrainConfig
    >>> from stabilizer.train import train
    >>> result = train(TrainConfig(max_steps=20, batch_size=8))
    >>> result.run_dir, result.final_eval["real"].accuracy

One step is: micro-batches (forward under the precision's autocast, backward,
scaled by the GradScaler in fp16), then unscale, clip, optimizer step, schedule
step. The only host-device syncs are at log steps (losses and grad norms are
kept on the device in between), at evaluation and at checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from stabilizer.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    read_checkpoint_extra,
    save_checkpoint,
)
from stabilizer.config import TraceSettings, TrainConfig
from stabilizer.data import check_samples, load_samples
from stabilizer.data.collate import BatchEncoder
from stabilizer.data.sample import NO_TYPE, VQASample
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.detector.replay import RecordedStep, scale_of
from stabilizer.distributed import RankGroup
from stabilizer.errors import BadSampleError, ConfigError
from stabilizer.evaluate import EvalResult, evaluate
from stabilizer.models.loading import LoadedModel, load_model
from stabilizer.models.lora import (
    allowed_components,
    apply_lora,
    parameter_table,
    verify_lora_scope,
)
from stabilizer.precision import DTYPES, PrecisionPlan, plan_precision
from stabilizer.preflight import PreflightReport, gate, preflight
from stabilizer.rundir import (
    EVAL_FILE,
    MetricsLog,
    RunLock,
    choose_run_dir,
    disk_full_error,
    is_disk_full,
    point_latest,
    prepare_run_dir,
    truncate_metrics,
    write_json_atomic,
)


@dataclass
class TrainResult:
    """What a run produced. ``losses[i]`` is the loss of optimizer step ``start_step + i``."""

    run_dir: Path
    start_step: int
    steps: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    nonfinite_steps: int = 0
    skipped_bad_samples: int = 0
    final_eval: dict[str, EvalResult] = field(default_factory=dict)
    majority_baseline: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    trace: object | None = None  # detector.session.SessionSummary with --trace


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, plan: PrecisionPlan, device: torch.device):
    """Load the base model, put LoRA on its Q-Former, check the scope. ``(loaded, peft_model)``."""
    # Presets are built straight on the target device: a real-size random init on
    # the CPU would take minutes and 16 GB before moving to a GPU.
    loaded = load_model(cfg.model, seed=cfg.seed, dtype=plan.base_dtype, device=device)
    peft_model = apply_lora(
        loaded.model,
        cfg.lora,
        adapter_dtype=plan.trainable_dtype if cfg.reproduces_classic_failure else None,
    )
    if cfg.reproduces_classic_failure:
        # The original report cast the wrapped model to half after get_peft_model,
        # which undoes peft's fp32 upcast of the adapters: do exactly that.
        peft_model.half()
    verify_lora_scope(peft_model, allowed_components(cfg.lora))
    if cfg.gradient_checkpointing:
        loaded.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    peft_model.to(device)
    return loaded, peft_model


def make_encoder(loaded: LoadedModel, cfg: TrainConfig) -> BatchEncoder:
    text_config = loaded.model.config.text_config
    max_positions = getattr(text_config, "max_position_embeddings", None)
    return BatchEncoder(
        loaded.processor,
        family=loaded.family,
        decoder_only=loaded.decoder_only,
        num_query_tokens=loaded.num_query_tokens,
        image_token_id=loaded.image_token_id,
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_answer_tokens=cfg.max_answer_tokens,
        max_lm_positions=max_positions if loaded.decoder_only else None,
    )


def load_checked_samples(
    cfg: TrainConfig, split: str, limit: int | None, encoder: BatchEncoder, console: Console
) -> tuple[list[VQASample], list[BadSampleError]]:
    """Load a split, check images and text, and check that every answer leaves a label.

    With ``--on-bad-sample skip`` a record is left out whichever check finds it bad
    (reading the file, its image, its labels); all of them are returned and counted.
    """
    bad: list[BadSampleError] = []
    skipped = bad if cfg.on_bad_sample == "skip" else None
    samples = load_samples(cfg.dataset, split, limit=limit, skipped=skipped)
    if not samples:
        first = f" (all {len(bad)} skipped as bad; first: {bad[0]})" if bad else ""
        raise ConfigError(f"--dataset {cfg.dataset}: split '{split}' has no usable sample{first}")
    good, bad_checked = check_samples(samples, cfg.on_bad_sample)
    bad += bad_checked
    kept = []
    for sample in good:
        try:
            encoder.train_batch([sample], pixel_values=torch.zeros(1))
        except BadSampleError as err:
            if cfg.on_bad_sample == "error":
                raise
            bad.append(err)
            continue
        kept.append(sample)
    if bad:
        console.print(
            f"[yellow]skipped {len(bad)} bad sample(s) of split '{escape(split)}' "
            f"(--on-bad-sample skip); first: {escape(str(bad[0]))}[/yellow]"
        )
    return kept, bad


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps, betas=(0.9, 0.999)
    )


def make_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class DataOrder:
    """Which samples form micro-batch ``m``: a fixed function of (seed, epoch, position).

    Keeping the order a pure function of the micro-batch index is what lets
    ``--resume`` continue with exactly the batches an uninterrupted run would see.
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int) -> None:
        self.n = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = n_samples // batch_size
        if self.per_epoch == 0:
            raise ConfigError(
                f"--batch-size {batch_size} is larger than the {n_samples} training samples"
            )
        self._epoch = -1
        self._order: list[int] = []

    def indices(self, micro_batch: int) -> tuple[int, list[int]]:
        epoch, position = divmod(micro_batch, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.n, generator=gen).tolist()
            self._epoch = epoch
        start = position * self.batch_size
        return epoch, self._order[start : start + self.batch_size]


def batches_of(
    cfg: TrainConfig,
    order: DataOrder,
    encoder: BatchEncoder,
    samples: Sequence[VQASample],
    step: int,
    rank: int = 0,
) -> tuple[int, list[dict[str, torch.Tensor]]]:
    """``(epoch, micro-batches)`` of optimizer step ``step`` for this rank, on the host."""
    batches = []
    epoch = 0
    for micro in range(cfg.grad_accum):
        epoch, idx = order.indices(step * cfg.grad_accum + micro)
        mine = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        batches.append(encoder.train_batch([samples[i] for i in mine]))
    return epoch, batches


def _rebuild_schedule(optimizer, scheduler) -> float:
    """The schedule of a resumed run whose horizon changed: its step count is kept,
    the rates are those of the new horizon at that step (the restored ones belong to
    the old one: a finished cosine would start the extension at lr 0)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return optimizer.param_groups[0]["lr"]
    rates = [
        base * fn(scheduler.last_epoch)
        for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)
    ]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates
    return rates[0]


def _resume_repaired(model, plan: PrecisionPlan, repaired: dict, log: Console) -> PrecisionPlan:
    """Put a resumed run back where its upcast repair left it: trainable tensors in
    fp32 before the optimizer is built (the checkpoint's fp32 values then load without
    rounding to fp16), the forward under autocast and, where it had one, a GradScaler."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    autocast = DTYPES.get({"float16": "fp16", "bfloat16": "bf16"}.get(repaired["autocast"], ""))
    log.print(
        f"resume: this run was repaired at step {repaired['step']}: trainable tensors in "
        f"fp32, the forward under {repaired['autocast']} autocast"
        + (" and a GradScaler" if repaired.get("grad_scaler") else "")
        + ", as it trained after the repair"
    )
    return dataclasses.replace(
        plan,
        trainable_dtype=torch.float32,
        autocast_dtype=autocast,
        use_grad_scaler=bool(repaired.get("grad_scaler")),
    )


def run_preflight(cfg, model, optimizer, scaler, batches, console: Console) -> PreflightReport:
    """Print the preflight table; stop on an error unless ``--preflight warn``.

    ``--adapter-dtype fp16`` asks for the classic failure on purpose: its own error
    (fp16 Adam's eps) is printed and the run goes on so the detector can show it.
    """
    report = preflight(
        model, optimizer, scaler=scaler, batches=batches, allowed=allowed_components(cfg.lora)
    )
    tolerated = ("fp16-adam-eps",) if cfg.reproduces_classic_failure else ()
    gate(report, mode=cfg.preflight, console=console, tolerated=tolerated)
    if tolerated and tolerated[0] in report.causes():
        console.print(
            "[yellow]preflight names the classic failure above; --adapter-dtype fp16 "
            "reproduces it on purpose, so training goes on to show it happen.[/]"
        )
    return report


def check(cfg: TrainConfig, *, console: Console | None = None) -> PreflightReport:
    """``stabilizer check``: build what ``train`` would (model, LoRA, data, optimizer,
    scaler, the first step's batches) and run the preflight; no step, no run folder."""
    console = console or Console()
    device = resolve_device(cfg.device)
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    seed_everything(cfg.seed)
    loaded, model = build_model(cfg, plan, device)
    encoder = make_encoder(loaded, cfg)
    samples, _ = load_checked_samples(cfg, cfg.train_split, cfg.max_train_samples, encoder, console)
    order = DataOrder(len(samples), cfg.batch_size, cfg.seed)
    optimizer = make_optimizer(model, cfg)
    make_schedule(optimizer, cfg, total_steps_of(cfg, order))  # warm-up sets initial_lr
    scaler = plan.grad_scaler(device.type)
    report = preflight(
        model,
        optimizer,
        scaler=scaler,
        batches=batches_of(cfg, order, encoder, samples, 0)[1],
        allowed=allowed_components(cfg.lora),
    )
    console.print(report.table(title=f"Preflight of {escape(cfg.model)} (no step run)"))
    return report


def total_steps_of(cfg: TrainConfig, order: DataOrder) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * order.per_epoch / cfg.grad_accum))


def majority_baseline(train: Sequence[VQASample], test: Sequence[VQASample]) -> dict[str, float]:
    """Accuracy of always answering the most common training answer (overall and by type)."""
    if not train or not test:
        return {}
    answer = Counter(s.answer for s in train).most_common(1)[0][0]
    out = {"all": sum(s.answer == answer for s in test) / len(test)}
    # Untyped samples are in "all" only, as in EvalResult.by_type (and must not overwrite it).
    for qtype in sorted({s.question_type for s in test} - {NO_TYPE}):
        rows = [s for s in test if s.question_type == qtype]
        out[qtype] = sum(s.answer == answer for s in rows) / len(rows)
    return out


def train_step(
    model: torch.nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    plan: PrecisionPlan,
    trainable: Sequence[torch.nn.Parameter],
    max_grad_norm: float | None,
    before_update: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``micro_batches`` (gradient accumulation).

    Returns ``(loss, grad_norm)`` as device tensors: nothing here waits for the
    device, so the caller decides when to pay for a host sync. The learning-rate
    schedule is left to the caller, who may refuse the step (a skipped step must
    not advance it). ``before_update`` runs after unscaling and clipping.
    """
    device = micro_batches[0]["input_ids"].device
    accum = len(micro_batches)
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        # Under DDP only the last micro-batch's backward all-reduces the gradients.
        last = i == accum - 1
        sync = (
            contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        )
        with sync:
            with plan.autocast(device.type):
                loss = model(**batch).loss / accum
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)
    # max_norm=inf measures without clipping, so the norm is always logged.
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf)
    if before_update is not None:
        before_update()
    if scaler is not None:
        scaler.step(optimizer)  # skips the update when grads hold inf/NaN
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm.detach()


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Run training as ``cfg`` says; returns the run folder, losses and the final evaluation.

    ``resume`` continues the run folder from its last checkpoint; ``overwrite`` deletes
    a previous run's files in it and starts afresh. One process trains a folder at a
    time (an exclusive lock, released when the process ends, even by kill -9).

    Under ``torchrun`` every rank calls this; rank 0 writes the run folder's shared files
    (config, metrics, checkpoints, evaluation, report) and each rank its own trace store.
    """
    console = console or Console()
    device = resolve_device(cfg.device)
    ranks = RankGroup.start(device.type)
    try:
        run_dir = choose_run_dir(cfg)
        if ranks is not None:
            run_dir = Path(ranks.broadcast_text(str(run_dir)))  # one timestamp for every rank
        held: list[RunLock] = []
        _on_main(ranks, lambda: held.append(RunLock(run_dir).acquire()), "lock the run folder")
        try:
            return _train(
                cfg,
                run_dir,
                resume=resume,
                overwrite=overwrite,
                console=console,
                device=device,
                ranks=ranks,
            )
        finally:
            for lock in held:
                lock.release()
    finally:
        if ranks is not None:
            ranks.close()


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    console: Console,
    device: torch.device,
    ranks: RankGroup | None,
) -> TrainResult:
    main = ranks is None or ranks.is_main
    world = ranks.world_size if ranks is not None else 1
    rank = ranks.rank if ranks is not None else 0
    if ranks is not None and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    # The other ranks stay quiet: rank 0 speaks for the run (anomalies speak for themselves).
    log = console if main else Console(quiet=True)
    plan = plan_precision(cfg.precision, cfg.adapter_dtype)
    if resume and find_latest_checkpoint(run_dir) is None:
        raise ConfigError(
            f"--resume: {run_dir} has no complete checkpoint to resume from (the run stopped "
            "before its first one): start it afresh with --overwrite (its files are "
            "deleted), or remove the folder"
        )
    _on_main(
        ranks,
        lambda: prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite),
        "prepare the run folder",
    )
    seed_everything(cfg.seed)
    if cfg.reproduces_classic_failure:
        log.print(
            "[bold yellow]--adapter-dtype fp16: reproducing the classic failure on purpose: "
            "base, LoRA adapters and AdamW state in fp16, no autocast, no GradScaler.[/]"
        )

    # -- model ---------------------------------------------------------------
    loaded, model = build_model(cfg, plan, device)
    log.print(parameter_table(model, title=f"Trainable parameters ({escape(cfg.model)})"))
    # ``model`` stays the plain peft model (probes, checkpoints, evaluation); the loop's
    # forward goes through ``forward_model``, DDP's wrapper when there are several ranks.
    forward_model = wrap_ddp(model, device, ranks) if ranks is not None else model

    # -- data ----------------------------------------------------------------
    encoder = make_encoder(loaded, cfg)
    train_samples, train_bad = load_checked_samples(
        cfg, cfg.train_split, cfg.max_train_samples, encoder, log
    )
    eval_samples, eval_bad = load_checked_samples(
        cfg, cfg.eval_split, cfg.max_eval_samples, encoder, log
    )
    # Each rank takes its slice of one global batch: N ranks see per step exactly the
    # samples a single process would with an N times larger --batch-size.
    order = DataOrder(len(train_samples), cfg.batch_size * world, cfg.seed)
    total_steps = total_steps_of(cfg, order)
    ranks_note = f" on each of {world} ranks" if world > 1 else ""
    log.print(
        f"data: {len(train_samples):,} train / {len(eval_samples):,} eval samples from "
        f"{escape(cfg.dataset)}; {total_steps:,} steps of {cfg.batch_size}x{cfg.grad_accum}"
        f"{ranks_note}; run folder {escape(str(run_dir))}"
    )

    # -- optimisation ----------------------------------------------------------
    # A run that --on-anomaly repair upcast resumes as it trained after the repair
    # (fp32 adapters and Adam state, autocast, GradScaler), not as its config began.
    repaired_precision = None
    if resume:
        repaired_precision = read_checkpoint_extra(find_latest_checkpoint(run_dir)).get(
            "repaired_precision"
        )
    if repaired_precision:
        plan = _resume_repaired(model, plan, repaired_precision, log)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_schedule(optimizer, cfg, total_steps)
    scaler = plan.grad_scaler(device.type)
    trainable = [p for p in model.parameters() if p.requires_grad]
    start_step = 0
    if resume:
        ckpt = find_latest_checkpoint(run_dir)
        state = load_checkpoint(
            ckpt, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
        )
        start_step = int(state["step"])
        if total_steps < start_step:
            raise ConfigError(
                f"--resume --max-steps {total_steps}: the checkpoint {ckpt.name} is already "
                f"at step {start_step}; pass a --max-steps above it to train further (a "
                "checkpoint is never rewound)"
            )
        log.print(f"resumed from {escape(str(ckpt))} at step {start_step}")
        planned = state["extra"].get("total_steps")
        if isinstance(planned, int) and planned != total_steps:
            lr = _rebuild_schedule(optimizer, scheduler)
            log.print(
                f"[yellow]resume: the run was planned for {planned:,} steps and now runs "
                f"{total_steps:,}: the learning-rate schedule is rebuilt for {total_steps:,} "
                f"steps from step {start_step} (lr now {lr:.3g}); the result differs from "
                f"an uninterrupted {total_steps:,}-step run[/]"
            )
        if main:
            truncate_metrics(run_dir, start_step, total_steps)  # the lines this run redoes

    # The first step's batches, built once: the preflight reads them, step one trains on them.
    first_batches = batches_of(cfg, order, encoder, train_samples, start_step, rank)
    preflight_report = None
    if cfg.preflight != "off":
        preflight_report = run_preflight(cfg, model, optimizer, scaler, first_batches[1], log)
        if main:
            (run_dir / "preflight.json").write_text(
                json.dumps(preflight_report.to_dict(), indent=2)
            )

    result = TrainResult(
        run_dir=run_dir,
        start_step=start_step,
        steps=total_steps,
        skipped_bad_samples=len(train_bad) + len(eval_bad),
    )
    session = None
    if cfg.trace:
        from stabilizer.detector.session import TraceSession

        session = TraceSession(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            trainable=trainable,
            settings=TraceSettings.from_train_config(cfg),
            run_dir=run_dir,
            console=console,
            compute_dtype=str(plan.autocast_dtype or plan.base_dtype).replace("torch.", ""),
            uses_grad_scaler=scaler is not None,
            meta={"config": cfg.to_dict()},
            resume_from=start_step if resume else None,
            train_config=cfg,
            ranks=ranks,
        )
        session.can_add_grad_scaler = True  # this loop adds one after an upcast repair
        if preflight_report is not None:
            session.preflight_causes = tuple(preflight_report.causes())
        stores = f"{session.store.path}" + (" (and one per rank)" if world > 1 else "")
        log.print(
            f"tracing {len(session.tracer.modules)} modules and {len(session.tracer.params)} "
            f"trainable tensors into {escape(stores)} (full statistics every {cfg.trace_every} "
            f"step(s); {session.policy_text})"
        )
    metrics = MetricsLog(run_dir / "metrics.jsonl") if main else None
    # Per-step values stay on the device until a log step copies them at once.
    pending_loss: list[torch.Tensor] = []
    pending_norm: list[torch.Tensor] = []
    pending_lr: list[float] = []  # the rate each step used (a host float: no sync)
    warned_nonfinite = False
    epoch = 0

    def flush_pending(step: int, *, collective: bool = True) -> None:
        nonlocal warned_nonfinite
        if not pending_loss:
            return
        # One device->host copy for all steps since the last log: a deliberate sync.
        values = torch.stack([*pending_loss, *pending_norm]).float().cpu()
        n = len(pending_loss)
        if ranks is not None and collective:
            # The logged loss is the mean over ranks (each rank's is of its own slice);
            # grad norms are already global after DDP's all-reduce.
            values[:n] = ranks.mean(values[:n]).float()
        values = values.tolist()
        losses, norms = values[:n], values[n:]
        first = step - n + 1
        lrs = list(pending_lr)
        for offset, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
            if metrics is not None:
                metrics.write(
                    {
                        "kind": "train",
                        "step": first + offset,
                        "loss": loss,
                        "grad_norm": norm,
                        "lr": lrs[offset],
                        "epoch": epoch,
                    }
                )
        result.losses.extend(losses)
        result.grad_norms.extend(norms)
        bad = [first + i for i, v in enumerate(losses) if not math.isfinite(v)]
        result.nonfinite_steps += len(bad)
        if bad and not warned_nonfinite and session is None:  # --trace has said more already
            warned_nonfinite = True
            log.print(
                f"[bold red]loss is not finite at step {bad[0]}[/]: the run goes on, but "
                "nothing is being learned. Rerun with --trace to find the first module and "
                "the cause."
            )
        pending_loss.clear()
        pending_norm.clear()
        pending_lr.clear()

    def checkpoint(step: int) -> None:
        # The steps a checkpoint holds have their metrics on disk before it counts.
        flush_pending(step - 1)

        def save() -> None:
            result.last_checkpoint = save_checkpoint(
                run_dir,
                step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                extra={
                    "epoch": epoch,
                    "total_steps": total_steps,
                    "world_size": world,
                    **({"repaired_precision": repaired_precision} if repaired_precision else {}),
                },
                keep_last=cfg.keep_last,
            )

        # Replicas are identical under DDP: rank 0 writes, the others wait for it.
        _on_main(ranks, save, f"write the checkpoint of step {step}")
        if not main:
            result.last_checkpoint = find_latest_checkpoint(run_dir)

    def evaluate_now(modes: list[str]) -> dict[str, EvalResult]:
        out: dict[str, EvalResult] = {}

        def run() -> None:
            out.update(run_eval(model, encoder, eval_samples, cfg, device, plan, modes))

        _on_main(ranks, run, "evaluate")
        return out

    if main:
        point_latest(run_dir)  # set up without error: runs/latest is this run from now on
    forward_model.train()
    interactive = log.is_terminal
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=log,
        disable=not interactive,
    )
    task = progress.add_task("train", total=total_steps, completed=start_step, status="")
    plain_every = max(cfg.log_every, total_steps // 20)
    started = time.perf_counter()
    last_log_time, last_log_step = started, start_step
    try:
        with progress:
            for step in range(start_step, total_steps):
                if first_batches is not None:
                    (epoch, host_batches), first_batches = first_batches, None
                else:
                    epoch, host_batches = batches_of(cfg, order, encoder, train_samples, step, rank)
                micro_batches = [
                    {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    for batch in host_batches
                ]
                # A repair (--on-anomaly repair) undoes the step and fixes the cause;
                # the step then runs again on the same batch.
                while True:
                    grad_scale = None
                    if session is not None:
                        session.begin_step(step)
                        if scaler is not None and session.replays:
                            grad_scale = scale_of(scaler)  # on the device: no sync
                    step_loss, grad_norm = train_step(
                        forward_model,
                        micro_batches,
                        optimizer=optimizer,
                        scaler=scaler,
                        plan=plan,
                        trainable=trainable,
                        max_grad_norm=session.max_grad_norm if session else cfg.max_grad_norm,
                        before_update=session.before_update if session else None,
                    )
                    step_lr = scheduler.get_last_lr()[0]  # the rate this step used
                    accepted = True
                    if session is not None:
                        accepted, _ = session.end_step(
                            step,
                            step_loss,
                            grad_norm,
                            micro_batches,
                            scheduler.get_last_lr()[0],
                            recorded=RecordedStep.from_batches(
                                micro_batches,
                                autocast_dtype=plan.autocast_dtype,
                                grad_scale=grad_scale,
                            ),
                        )
                    if accepted:
                        scheduler.step()
                    if session is not None and session.autocast_dtype and not plan.autocast_dtype:
                        # A repair upcast the adapters over 16-bit base weights: from now
                        # on (the redo, later steps, evaluation) the loop runs autocast,
                        # and in fp16 scales its loss, as --precision fp16 does.
                        plan = dataclasses.replace(plan, autocast_dtype=session.autocast_dtype)
                        if session.uses_grad_scaler and scaler is None:
                            scaler = torch.amp.GradScaler(device.type)
                            plan = dataclasses.replace(plan, use_grad_scaler=True)
                        repaired_precision = {
                            "step": step,
                            "autocast": str(plan.autocast_dtype).replace("torch.", ""),
                            "grad_scaler": scaler is not None,
                        }
                    if session is None or not session.take_redo():
                        break
                pending_lr.append(step_lr)
                pending_loss.append(step_loss)
                pending_norm.append(grad_norm)

                done = step + 1
                if done % cfg.log_every == 0 or done == total_steps:
                    flush_pending(step)
                    now = time.perf_counter()
                    rate = (done - last_log_step) / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, done
                    status = (
                        f"loss {result.losses[-1]:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                        f"grad {result.grad_norms[-1]:.3g}  {rate:.1f} it/s  "
                        f"non-finite {result.nonfinite_steps}"
                    )
                    progress.update(task, completed=done, status=status)
                    if not interactive and (done % plain_every == 0 or done == total_steps):
                        log.print(f"step {done}/{total_steps}  {status}")
                if cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
                    quick = evaluate_now(["real"])
                    if main:
                        metrics.write({"kind": "eval", "step": done, **quick["real"].to_dict()})
                        log.print(f"step {done}: eval accuracy {quick['real'].accuracy:.3f}")
                    forward_model.train()
                if _due(cfg, done, order) and done != total_steps:
                    checkpoint(done)
            flush_pending(total_steps - 1)
            if session is not None:
                session.flush()  # the last step, when judged late (--judge-late)
        checkpoint(total_steps)  # the final checkpoint is always written
    except BaseException as exc:
        # Nothing logged is lost on a crash or Ctrl-C: write what is pending first. No
        # collective here: the other ranks may not be failing with this one.
        full = is_disk_full(exc)
        try:
            flush_pending(start_step + len(result.losses) + len(pending_loss) - 1, collective=False)
        except OSError:
            if not full:
                raise
        if metrics is not None:
            metrics.close()
        if session is not None:
            session.close(failing=True)
            # A stop on an anomaly is agreed, so every rank is here: wait until all stores
            # are closed before rank 0 reads them (torchrun ends the job at the first exit).
            if ranks is not None and isinstance(exc, NumericalAnomalyError):
                ranks.barrier()
            if main:
                _write_report(run_dir, log)  # also when stopped on an anomaly or crashed
            if ranks is not None and isinstance(exc, NumericalAnomalyError):
                ranks.barrier()
        if full:
            raise disk_full_error(run_dir, find_latest_checkpoint(run_dir)) from exc
        raise
    if session is not None:
        result.trace = session.summary
        session.close()
    elapsed = time.perf_counter() - started
    log.print(
        f"trained {total_steps - start_step} steps in {elapsed:.1f} s; "
        f"final checkpoint {escape(str(result.last_checkpoint))}"
    )

    # -- final evaluation -----------------------------------------------------------
    modes = ["real", "blank", "shuffled"] if cfg.blank_and_shuffled_eval else ["real"]
    result.final_eval = evaluate_now(modes)
    if main:
        result.majority_baseline = majority_baseline(train_samples, eval_samples)
        for res in result.final_eval.values():
            metrics.write({"kind": "eval", "step": total_steps, **res.to_dict()})
        metrics.close()
        write_json_atomic(
            run_dir / EVAL_FILE,
            {
                "step": total_steps,
                "eval_split": cfg.eval_split,
                "results": {m: r.to_dict() for m, r in result.final_eval.items()},
                "majority_baseline": result.majority_baseline,
                "nonfinite_steps": result.nonfinite_steps,
                "skipped_bad_samples": result.skipped_bad_samples,
                "anomalies": len(result.trace.anomalies) if result.trace else None,
                "skipped_steps": result.trace.skipped_steps if result.trace else None,
                "world_size": world,
            },
        )
        log.print(accuracy_table(result.final_eval, result.majority_baseline))
    if result.trace is not None:
        # Every rank's store is closed before rank 0 merges them into the report.
        if ranks is not None:
            ranks.barrier()
        if main:
            _write_report(run_dir, log)
    return result


def wrap_ddp(model: torch.nn.Module, device: torch.device, ranks: RankGroup):
    """DDP around the peft model: gradients of the trainable tensors are averaged."""
    from torch.nn.parallel import DistributedDataParallel

    # The frozen base has no running statistics: nothing to re-sync before each forward.
    # (torch 2.13 renamed the switch; older releases only know the first name.)
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in accepted
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
    )


def _on_main(ranks: RankGroup | None, work: Callable[[], None], what: str) -> None:
    """Run ``work`` on rank 0 while the others wait; a failure there stops every rank.

    Without this, an error on rank 0 (a full disk, a folder that already holds a run)
    would leave the other ranks waiting at their next collective until it times out.
    """
    if ranks is None:
        work()
        return
    error: BaseException | None = None
    if ranks.is_main:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
            error = exc
    if ranks.any_true(error is not None):
        if error is not None:
            raise error
        raise ConfigError(f"rank 0 failed to {what}; its error is in rank 0's output")


def _write_report(run_dir: Path, console: Console) -> None:
    """The HTML report of a traced run; a failure here must never hide the run's own."""
    try:
        from stabilizer.reports import write_report

        page = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        console.print(
            f"[yellow]could not write the report: {type(exc).__name__}: {escape(str(exc))}[/]"
        )
        return
    console.print(f"report: {escape(str(page))}")


def _due(cfg: TrainConfig, done: int, order: DataOrder) -> bool:
    if cfg.save_every and done % cfg.save_every == 0:
        return True
    if cfg.save_every_epochs:
        steps_per_epoch = max(1, order.per_epoch // cfg.grad_accum)
        return done % (steps_per_epoch * cfg.save_every_epochs) == 0
    return False


def run_eval(model, encoder, samples, cfg, device, plan, modes) -> dict[str, EvalResult]:
    return {
        mode: evaluate(
            model,
            encoder,
            samples,
            images=mode,
            batch_size=cfg.eval_batch_size,
            device=device,
            autocast=lambda: plan.autocast(device.type),
        )
        for mode in modes
    }


def accuracy_table(results: dict[str, EvalResult], baseline: dict[str, float]) -> Table:
    """Accuracy by question type: real images next to blank, shuffled and the majority answer."""
    table = Table(title="Test accuracy (does the Q-Former see the image?)")
    table.add_column("question type")
    columns = list(results)
    for mode in columns:
        table.add_column(f"{mode} images", justify="right")
    if baseline:
        table.add_column("majority answer", justify="right")
    first = results[columns[0]]
    for qtype in [*first.by_type, "all"]:
        # Types are data: a "[/]" in one would be read as rich markup and crash the table.
        row = [escape(qtype) if qtype != "all" else "[bold]all[/]"]
        for mode in columns:
            res = results[mode]
            value = res.accuracy if qtype == "all" else res.by_type.get(qtype, math.nan)
            row.append(f"{value:.3f}")
        if baseline:
            row.append(f"{baseline.get(qtype, math.nan):.3f}")
        count = first.count if qtype == "all" else first.count_by_type.get(qtype, 0)
        row[0] += f" ({count})"
        table.add_row(*row)
    return table
