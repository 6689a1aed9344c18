"""``stabilizer train --trace`` for a ``transformers.Trainer`` run: one callback.

    from stabilizer.integrations import StabilizerCallback

    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      callbacks=[StabilizerCallback(on_anomaly="skip")])
    trainer.train()          # an anomaly prints its diagnosis; a skipped step says so
    # then: open <args.output_dir>/stabilizer/report.html   (or: stabilizer report RUN_DIR)

The same probes, detector, policies and trace store as ``stabilizer train
--trace`` (a :class:`~stabilizer.detector.session.TraceSession` does the work;
this module only maps Trainer's events onto it). The run folder
(``run_dir``, default ``<args.output_dir>/stabilizer``) holds:

| file                     | what                                                            |
|--------------------------|-----------------------------------------------------------------|
| ``trace.db``             | one row per optimizer step (``state.global_step``), per-module  |
|                          | statistics, anomalies with their diagnosis, policy actions      |
| ``trace.rank<r>.db``     | rank r's store under torchrun (r > 0)                           |
| ``report.html``, report/ | written at the end of training (rank 0), also when it stops on  |
|                          | an anomaly                                                      |

How Trainer's events drive the session (transformers 5.24, ``trainer.py``):

| event                   | when Trainer fires it                          | here                             |
|-------------------------|------------------------------------------------|----------------------------------|
| on_train_begin          | optimizer, scheduler, accelerate wrapping done | open the session (probes, store) |
|                         | (l. 1653, after ``_prepare_for_training``)     |                                  |
| on_step_begin           | before the first micro-batch of an optimizer   | attach probes; ``begin_step``    |
|                         | step (l. 1901-1902), once per step under       | (snapshot for skip/rollback)     |
|                         | gradient accumulation                          |                                  |
| model forward           | each micro-batch (``training_step``)           | keep the loss on the device      |
| on_pre_optimizer_step   | after every backward and after                 | ``before_update``: per-tensor    |
|                         | ``clip_grad_norm_`` (l. 1937-1942)             | grad norms; the total grad norm  |
| on_optimizer_step       | right after ``optimizer.step()`` (l. 1943-44), | ``end_step``: check, policy      |
|                         | before ``lr_scheduler.step()`` (l. 1949-1952)  |                                  |
| on_step_end             | after the scheduler step, ``zero_grad`` and    | a refused step: put the schedule |
|                         | ``global_step += 1`` (l. 1952-1957)            | back; detach the probes          |
| on_train_end            | end of ``train()`` (l. 2038)                   | close the store, write report    |

What the recorded numbers mean:

- ``loss``: the mean over the step's micro-batches of the loss the model
  returned (``outputs["loss"]``, or ``outputs[0]`` for tuples), read by a
  forward hook and kept on the device, so Trainer's per-step loss without a host
  sync. When Trainer hands the model ``num_items_in_batch`` (models whose forward
  takes ``**kwargs``), each micro-batch loss is already a share of the step's and
  they are summed instead, as Trainer does. A model that returns no loss
  (Trainer computes it: ``label_smoothing_factor``, ``compute_loss_func``, an
  overridden ``compute_loss``) stops the run at the first forward with a
  ``ConfigError``: a loss stabilizer cannot see would read as a NaN loss.
- ``grad_norm`` and the per-tensor gradient norms: the trainable gradients as
  the optimizer receives them, i.e. *after* Trainer clipped them to
  ``args.max_grad_norm`` (Trainer clips before ``on_pre_optimizer_step`` and
  hands callbacks neither the norm nor a pre-clip event). On steps that were
  not clipped this is the pre-clip norm; on clipped ones it is
  ``max_grad_norm``; ``meta["config"]["grad_norm_measured"]`` says so.
  Trainer's own logs keep the pre-clip norm. One NaN gradient makes the clip
  turn every gradient NaN, so the per-tensor gradient flags then name all
  tensors; module gradients (``grad_out``/``grad_in``), measured by hooks
  during backward before any clipping, still name the first module.
- ``lr``: the rate the step used (``lr_scheduler.get_last_lr()[0]``).

A refused step (``skip``, ``clip``, ``rollback``, or a GradScaler skip): the
session puts the trainable weights and the optimizer state back in
``on_optimizer_step``; Trainer then advances the schedule anyway (l. 1952), so
the scheduler's state and the optimizer's learning rates saved right after the
policy acted are restored in ``on_step_end``. The next step runs at the rate
the refused one had. ``global_step`` still counts the refused step, as
``stabilizer train`` does.

Limits: one process or torchrun (DDP); DataParallel (several GPUs without
torchrun), DeepSpeed, FSDP and ``torch_compile`` are refused with a message.
The first anomaly is replayed op by op and in fp32 as with ``stabilizer train``:
the step's forwards are recorded as Trainer called the model (micro-batch losses
are not divided by the accumulation count in the replay: that changes gradient
sizes, not where they first go non-finite). An exception that is not stabilizer's (out of memory,
Ctrl-C) reaches no callback: the store stays readable (one commit per step),
and ``callback.close()`` or ``with StabilizerCallback(...) as cb:`` removes the
hooks and writes the report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from stabilizer.config import PREFLIGHT_MODES, TraceSettings
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.detector.replay import RecordedStep, loss_of, scale_of
from stabilizer.errors import ConfigError
from stabilizer.preflight import gate, preflight
from stabilizer.probes.batched import exact_norms
from stabilizer.watcher import _unwrap_optimizer

_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class StabilizerCallback(TrainerCallback):
    """Trace a ``transformers.Trainer`` run like ``stabilizer train --trace``.

    Args:
        run_dir: where the trace store and the report go
            (default ``<args.output_dir>/stabilizer``).
        on_anomaly: ``raise`` (stop with the diagnosis), ``skip`` (undo the step's
            update, keep the schedule where it was), ``clip`` (as skip, then clamp the
            offender or halve ``args.max_grad_norm``), ``rollback`` (last good state,
            learning rate x ``rollback_lr_factor``), ``warn``, or ``repair`` (apply the
            diagnosed fix in place, as ``stabilizer train --on-anomaly repair``; the
            step's update is undone).
        max_repairs: with ``repair``, stop after this many repairs.
        on_warning: ``warn`` (an early warning prints its card, training goes on) or
            ``raise`` (stop at it).
        judge_late: ``auto`` (default), ``on`` or ``off``: with ``warn``, each step is
            judged at the end of the next, so no step ends in a host-device sync;
            ``auto`` does so on a GPU.
        trace_every: full per-module statistics every N steps (the NaN/Inf check
            runs every step).
        probe: regex of module names to probe (default: the Q-Former preset when
            the model has a Q-Former, else every leaf module with parameters).
        max_anomalies: stop with the diagnosis after this many anomalies.
        rollback_lr_factor: learning-rate factor of the rollback policy.
        tensorboard: also write TensorBoard event files beside the store.
        wandb: also log the trace to a W&B run in the run folder (offline unless
            ``WANDB_MODE`` is set; ``pip install 'stabilizer[wandb]'``).
        report: write ``report.html`` when training ends or stops.
        preflight: ``stop`` (default), ``warn`` or ``off``: the checks of
            ``stabilizer check`` on the model, optimizer and scaler at
            ``on_train_begin``; an error stops before step 0.
        console: a ``rich.console.Console`` for what stabilizer prints.

    After ``trainer.train()`` returns, ``callback.summary`` holds the session's
    anomalies, warnings and skipped steps, and ``callback.report_path`` the report.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        *,
        on_anomaly: str = "skip",
        on_warning: str = "warn",
        judge_late: str = "auto",
        trace_every: int = 1,
        probe: str | None = None,
        max_anomalies: int = 10,
        max_repairs: int = 5,
        rollback_lr_factor: float = 0.5,
        tensorboard: bool = False,
        wandb: bool = False,
        report: bool = True,
        preflight: str = "stop",
        console=None,
    ) -> None:
        # Validated here, so a bad option fails where the callback is built, not at step 0.
        if preflight not in PREFLIGHT_MODES:
            raise ConfigError(
                f"StabilizerCallback: preflight must be one of {', '.join(PREFLIGHT_MODES)}, "
                f"got {preflight!r}"
            )
        self.preflight = preflight
        self.preflight_report = None
        try:
            self.settings = TraceSettings(
                probe=probe,
                trace_every=trace_every,
                on_anomaly=on_anomaly,
                on_warning=on_warning,
                judge_late=judge_late,
                max_anomalies=max_anomalies,
                max_repairs=max_repairs,
                rollback_lr_factor=rollback_lr_factor,
                tensorboard=tensorboard,
                wandb=wandb,
            )
            if probe is not None:
                re.compile(probe)
        except ConfigError as err:
            raise ConfigError(f"StabilizerCallback: {err}") from err
        except re.error as err:
            raise ConfigError(
                f"StabilizerCallback: probe '{probe}' is not a valid regular expression: {err}"
            ) from err
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.report = report
        self.console = console
        self.session = None  # the TraceSession while training runs
        self.summary = None  # its SessionSummary once training ended or stopped
        self.report_path: Path | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._trainable: list[torch.nn.Parameter] = []
        self._loss_handle = None
        self._loss_factor = 1.0
        self._reset_step()

    def _reset_step(self) -> None:
        self._in_step = False
        self._step = -1
        self._losses: list[torch.Tensor] = []
        self._loss_is_share = False
        self._labels: list[torch.Tensor] = []
        self._calls: list[tuple[tuple, dict]] = []
        self._grad_scale: torch.Tensor | float | None = None
        self._grad_norm: torch.Tensor | None = None
        self._refused: tuple[dict, list[float]] | None = None

    # -- events --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        from rich.console import Console

        from stabilizer.detector.session import TraceSession

        self._finish(report=False, failing=True)  # a train() that crashed left one open
        self._reset_step()
        _refuse_unsupported(args)
        model = _unwrap_model(kwargs["model"])
        optimizer = _unwrap_optimizer(kwargs["optimizer"])
        scheduler = kwargs.get("lr_scheduler")
        self._optimizer = optimizer
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        if self.console is None:
            self.console = Console()
        ranks = _rank_group(args)
        if self.preflight != "off":
            self.preflight_report = preflight(
                model, optimizer, scaler=getattr(kwargs["optimizer"], "scaler", None)
            )
            quiet = ranks is not None and not ranks.is_main
            gate(
                self.preflight_report,
                mode=self.preflight,
                console=Console(quiet=True) if quiet else self.console,
            )
        world = ranks.world_size if ranks is not None else 1
        # With num_items_in_batch Trainer scales the loss by the process count after the
        # model (average_tokens_across_devices); the recorded loss does the same.
        self._loss_factor = float(world) if args.average_tokens_across_devices else 1.0
        compute_dtype = _compute_dtype(args, model)
        eps = optimizer.param_groups[0].get("eps") if optimizer.param_groups else None
        settings = dataclasses.replace(
            self.settings,
            adam_eps=eps if isinstance(eps, float) else None,
            max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        )
        run_dir = self.run_dir or Path(args.output_dir) / "stabilizer"
        self.session = TraceSession(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            trainable=self._trainable,
            settings=settings,
            run_dir=run_dir,
            console=self.console,
            compute_dtype=compute_dtype,
            # accelerate keeps the GradScaler on its optimizer wrapper (fp16 on CUDA).
            uses_grad_scaler=getattr(kwargs["optimizer"], "scaler", None) is not None,
            meta=_meta(args, model, self._trainable, settings, compute_dtype, kwargs),
            # A resumed run keeps the steps before the checkpoint and replaces the rest.
            resume_from=state.global_step or None,
            ranks=ranks,
        )
        if self.preflight_report is not None:
            self.session.preflight_causes = tuple(self.preflight_report.causes())
        # Probes are attached only inside optimizer steps, so evaluation and prediction
        # during training run without them (their statistics would be thrown away).
        self.session.tracer.close()
        self._loss_handle = model.register_forward_hook(self._keep_loss, with_kwargs=True)
        if ranks is None or ranks.is_main:
            where = f"{self.session.store.path}" + (" (and one per rank)" if world > 1 else "")
            self.console.print(
                f"stabilizer: tracing {len(self.session.tracer.modules)} modules and "
                f"{len(self._trainable)} trainable tensors into {where} (full statistics "
                f"every {settings.trace_every} step(s); {self.session.policy_text})"
            )

    def on_step_begin(self, args, state, control, **kwargs):
        if self.session is None:
            return
        self._reset_step()
        self._step = state.global_step
        self.session.tracer.attach()
        self.session.begin_step(self._step)
        self._in_step = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.session is None:
            return
        self.session.before_update()
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)
        if scaler is not None and self.session.replays:
            self._grad_scale = scale_of(scaler)  # before AcceleratedOptimizer's update()
        grads = [p.grad for p in self._trainable if p.grad is not None]
        # On the device: the step's one host copy happens in end_step.
        self._grad_norm = torch.linalg.vector_norm(exact_norms(grads)) if grads else None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.session is None:
            return
        self._in_step = False
        scheduler = kwargs.get("lr_scheduler")
        counts = [(labels != -100).sum() for labels in self._labels]
        try:
            accepted, _ = self.session.end_step(
                self._step,
                self._step_loss(),
                self._grad_norm,
                lr=self._lr(scheduler),
                label_tokens=torch.stack(counts).min() if counts else None,
                recorded=self._recorded(),
            )
        except BaseException as exc:
            # NumericalAnomalyError (raise, or too many anomalies): it reaches the user
            # from trainer.train() with the diagnosis; the report is written first. The
            # stop is agreed between ranks, so every rank is here and may wait for the rest.
            self._finish(
                report=self.report,
                failing=True,
                all_ranks=isinstance(exc, NumericalAnomalyError),
            )
            raise
        self._losses, self._labels, self._calls = [], [], []
        if not accepted and scheduler is not None:
            # Trainer steps the schedule right after this event; on_step_end undoes it.
            # Saved after the policy acted: rollback's lower rates are kept.
            self._refused = (
                copy.deepcopy(scheduler.state_dict()),
                [group["lr"] for group in self._optimizer.param_groups],
            )
        clip = self.session.max_grad_norm
        if clip is not None and clip != args.max_grad_norm:
            args.max_grad_norm = clip  # the clip policy lowered it; Trainer clips with args

    def on_step_end(self, args, state, control, **kwargs):
        if self.session is None:
            return
        if self._refused is not None:
            scheduler_state, rates = self._refused
            kwargs["lr_scheduler"].load_state_dict(scheduler_state)
            for group, rate in zip(self._optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
            self._refused = None
        self.session.tracer.close()

    def on_train_end(self, args, state, control, **kwargs):
        if self.session is not None:
            self.session.flush()  # the step still held when judging late
            self.session.store.set_meta(completed=True)
        self._finish(report=self.report, all_ranks=True)

    # -- the loss ------------------------------------------------------------------------
    def _keep_loss(self, module, args, kwargs, output):
        if not (self._in_step and module.training and torch.is_grad_enabled()):
            return None
        loss = loss_of(output)
        if loss is None:
            self._finish(report=False, failing=True)
            raise ConfigError(
                f"StabilizerCallback: {type(module).__name__} returned no loss in training "
                "(the Trainer computes it outside the model: label_smoothing_factor, "
                "compute_loss_func or an overridden compute_loss?). stabilizer reads the loss "
                "from the model's output; let the model compute it (pass `labels`), or leave "
                "the callback out of this run"
            )
        self._losses.append(loss.detach().float().reshape(()))
        self._calls.append((args, dict(kwargs)))  # what the replay re-runs
        self._loss_is_share |= kwargs.get("num_items_in_batch") is not None
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
            self._labels.append(labels)  # label tokens of the step (all masked -> NaN loss)
        return None

    def _recorded(self) -> RecordedStep:
        """The step's forwards as Trainer called the model, for the replay."""
        tracer = self.session.tracer
        autocast = None
        if tracer.autocast_dtype is not None and self._calls:
            device = next(
                (v.device.type for v in self._calls[0][1].values() if isinstance(v, torch.Tensor)),
                "cpu",
            )
            autocast = (device, tracer.autocast_dtype)
        return RecordedStep(
            calls=self._calls,
            autocast=autocast,
            grad_scale=self._grad_scale,
            why_not=None if self._calls else "no forward of the model was seen this step",
        )

    def _step_loss(self) -> torch.Tensor | None:
        if not self._losses:
            return None
        losses = torch.stack(self._losses)
        if self._loss_is_share:
            return losses.sum() * self._loss_factor
        return losses.mean()

    def _lr(self, scheduler) -> float:
        if scheduler is not None and hasattr(scheduler, "get_last_lr"):
            return float(scheduler.get_last_lr()[0])
        return float(self._optimizer.param_groups[0]["lr"])

    # -- the end -------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook, close the store and write the report (idempotent).

        Needed only when training stopped on an error that is not stabilizer's."""
        self._finish(report=self.report, failing=True)

    def __enter__(self) -> StabilizerCallback:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _finish(self, *, report: bool, failing: bool = False, all_ranks: bool = False) -> None:
        """Close the session; ``failing``: an error is on its way, never replace it.

        ``all_ranks``: every rank is finishing here (train end, an agreed stop), so rank 0
        waits until every store is closed before it merges them into the report.
        """
        if self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None
        session, self.session = self.session, None
        self._in_step = False
        if session is None:
            return
        self.summary = session.summary
        try:
            session.close(failing=failing)
        except Exception as err:
            if not failing:
                raise
            self.console.print(f"[red]stabilizer: closing the trace store failed: {err}[/]")
        if all_ranks and session.ranks is not None:
            session.ranks.barrier()
        if report and session.rank == 0:
            self._write_report(session.run_dir)

    def _write_report(self, run_dir: Path) -> None:
        from stabilizer.reports import write_report

        try:
            self.report_path = write_report(run_dir)
        except Exception as err:  # a report failure must not hide training's own outcome
            self.console.print(
                f"[red]stabilizer: the report failed: {type(err).__name__}: {err}[/]"
            )
            return
        self.console.print(f"stabilizer: report written to {self.report_path}")


# -- helpers ---------------------------------------------------------------------------------


def _refuse_unsupported(args) -> None:
    if args.n_gpu > 1:
        what = f"Trainer uses torch.nn.DataParallel over {args.n_gpu} GPUs"
        fix = (
            "launch with torchrun (DDP, one store per rank) or show one GPU (CUDA_VISIBLE_DEVICES)"
        )
    elif getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        what = "DeepSpeed/FSDP shard the trainable tensors and the optimizer state"
        fix = "trace a DDP (torchrun) or single-process run"
    elif getattr(args, "torch_compile", False):
        what = "torch_compile=True: module hooks do not run inside compiled graphs"
        fix = "trace an eager run (torch_compile=False)"
    else:
        return
    raise ConfigError(f"StabilizerCallback cannot trace this run: {what}; {fix}")


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    # Callbacks get trainer.model (already unwrapped); a DDP wrapper can still come from
    # custom setups. Compiled modules are kept: the tracer refuses them with a message.
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=True)


def _rank_group(args):
    """The torchrun group when Trainer runs in several processes (None in one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    from stabilizer.distributed import RankGroup

    # accelerate initialised the process group: join it, never own (or destroy) it.
    return RankGroup(
        dist.get_rank(), dist.get_world_size(), args.local_process_index, owns_group=False
    )


def _compute_dtype(args, model: torch.nn.Module) -> str:
    if args.bf16:
        return "bfloat16"
    if args.fp16:
        return "float16"
    # No autocast: the forward runs in the dtype that holds most of the weights.
    sizes: Counter = Counter()
    for param in model.parameters():
        if param.dtype in _SHORT_DTYPE:
            sizes[param.dtype] += param.numel()
    dtype = sizes.most_common(1)[0][0] if sizes else torch.float32
    return str(dtype).removeprefix("torch.")


def _meta(args, model, trainable, settings: TraceSettings, compute_dtype: str, kwargs) -> dict:
    """What the store keeps about the run; ``config`` holds the keys the report reads."""
    dtypes = Counter(_SHORT_DTYPE.get(p.dtype, str(p.dtype)) for p in trainable)
    config: dict[str, Any] = {
        "source": "transformers.Trainer",
        "model": _model_name(model),
        "dataset": _dataset_name(kwargs.get("train_dataloader")),
        "precision": _SHORT_DTYPE[getattr(torch, compute_dtype)],
        "adapter_dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "lr": args.learning_rate,
        "on_anomaly": settings.on_anomaly,
        "max_steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm,
        "grad_norm_measured": "after clipping" if args.max_grad_norm > 0 else "before clipping",
        "seed": args.seed,
        "trace_every": settings.trace_every,
        "judge_late": settings.judge_late,
        "probe": settings.probe,
    }
    lora = _lora_settings(model)
    if lora:
        config["lora"] = lora
    return {
        "config": config,
        "completed": False,  # set at on_train_end (a resumed store may hold an old True)
        "run_name": Path(args.output_dir).name or "trainer",  # the report's title
        "source": "transformers.Trainer",
        "model_class": type(model).__name__,
        # JSON-safe: TrainingArguments may hold enums, paths or objects.
        "training_args": json.loads(json.dumps(args.to_dict(), default=str)),
    }


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return f"{type(model).__name__} ({name})" if name else type(model).__name__


def _dataset_name(dataloader) -> str | None:
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None:
        return None
    try:
        return f"{type(dataset).__name__} ({len(dataset)} samples)"
    except TypeError:  # an IterableDataset has no length
        return type(dataset).__name__


def _lora_settings(model) -> dict | None:
    """peft's LoRA settings of the active adapter, in the report's ``lora`` keys."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    config = config or next(iter(configs.values()))
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (set, frozenset, list, tuple)):
        targets = sorted(targets)
    out = {"targets": targets, "rank": getattr(config, "r", None)}
    if getattr(config, "lora_alpha", None) is not None:
        out["alpha"] = config.lora_alpha
    return out
