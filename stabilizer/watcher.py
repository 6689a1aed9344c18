"""``stabilizer.watch``: the diagnosis of ``stabilizer train --trace`` around your own loop.

    import stabilizer

    with stabilizer.watch(model, optimizer, scaler=scaler) as watch:   # the only line
        for batch in loader:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.step(optimizer); scaler.update(); optimizer.zero_grad()

At the first NaN/Inf the loop stops with :class:`stabilizer.NumericalAnomalyError`
(``on_anomaly="raise"``), whose ``.anomaly`` names the step, the pass, the first
module, the exact aten op and the cause with its fix; ``runs/watch-<time>/``
holds the trace store and ``report.html``, as for ``stabilizer train --trace``.

What it learns without being told:

| what                 | from                                                             |
|----------------------|------------------------------------------------------------------|
| step boundaries      | the optimizer's own step (step pre/post hooks); under gradient   |
|                      | accumulation the forwards before one step are one step; a step   |
|                      | the GradScaler skipped ends at the next forward                  |
| trainable tensors    | the optimizer's param groups                                     |
| Adam's eps, the lr   | ``param_groups[0]["eps"]`` / ``["lr"]``                          |
| compute dtype        | autocast at the step's first hook, else the probed outputs'      |
|                      | dtype (fp16 / bf16 / fp32)                                       |
| the loss             | ``.loss`` / ``["loss"]`` of the outermost module called with a   |
|                      | ``labels`` argument (the model, or the LM of a custom forward);  |
|                      | ``watch.loss(loss)`` for a loss computed outside the model       |
| label count          | the ``labels`` that module was called with (-100 is masked)      |
| GradScaler misuse    | ``scaler.scale`` used and the optimizer stepped with no          |
|                      | ``unscale_``/``scaler.step`` for it: scaled gradients applied    |
| what to replay       | the root module's calls of the step (args and kwargs as passed); |
|                      | an optimizer-pass anomaly replays from the gradients it stepped  |
|                      | on, so it needs no forward at all                                |

The face is thin on purpose: the probes, the detector, the policies, the store
and the replay are the :class:`~stabilizer.detector.session.TraceSession` that
``stabilizer train`` and the Trainer callback use too.

Policies in your loop: ``skip`` undoes the step's update in the optimizer's own
step (weights and optimizer state as before it; your scheduler, if you pass none,
still advances); ``rollback`` restores the last good state and lowers the
optimizer's learning rates (and ``scheduler.base_lrs`` when you pass
``scheduler=``); ``clip`` clamps a forward offender's output from then on, or
clips the gradient norm right before each optimizer step; ``warn`` goes on.

Under several processes (``accelerate launch``, or torchrun with your own
``init_process_group``) the watch joins the process group it finds: each rank
writes its own store into one run folder, every rank acts on the same step (one
small collective per step, as under ``stabilizer train``), and rank 0 writes the
report. What ``accelerator.prepare`` returns needs no unwrapping by you.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

from stabilizer.config import PREFLIGHT_MODES, TraceSettings
from stabilizer.data.collate import IGNORE_INDEX
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.detector.replay import RecordedStep, loss_of
from stabilizer.detector.session import SessionSummary, TraceSession, trainable_of
from stabilizer.distributed import RankGroup, env_world
from stabilizer.errors import ConfigError
from stabilizer.preflight import PreflightReport, gate, preflight

_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Watch:
    """A watched training loop; use it as ``with stabilizer.watch(...) as watch:``.

    After the ``with`` block: ``watch.anomalies`` and ``watch.warnings`` (each an
    :class:`~stabilizer.detector.diagnosis.Anomaly` with ``card()``),
    ``watch.skipped_steps``, ``watch.steps`` (optimizer steps seen), ``watch.run_dir``
    and ``watch.report_path``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer,
        *,
        scaler: torch.amp.GradScaler | None = None,
        scheduler=None,
        run_dir: str | Path | None = None,
        on_anomaly: str = "raise",
        on_warning: str = "warn",
        judge_late: str = "auto",
        trace_every: int = 1,
        probe: str | None = None,
        max_anomalies: int = 10,
        max_repairs: int = 5,
        rollback_lr_factor: float = 0.5,
        replay: bool = True,
        report: bool = True,
        tensorboard: bool = False,
        wandb: bool = False,
        preflight: str = "stop",
        console=None,
    ) -> None:
        if preflight not in PREFLIGHT_MODES:
            raise ConfigError(
                f"stabilizer.watch: preflight must be one of {', '.join(PREFLIGHT_MODES)}, "
                f"got {preflight!r}"
            )
        self.preflight = preflight
        self.preflight_report: PreflightReport | None = None
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
                replay=replay,
                tensorboard=tensorboard,
                wandb=wandb,
            )
        except ConfigError as err:
            raise ConfigError(f"stabilizer.watch: {_as_argument(str(err))}") from err
        self.model = _unwrap_model(model)
        self.optimizer = _unwrap_optimizer(optimizer)
        # accelerate keeps its GradScaler on the optimizer wrapper (fp16 on CUDA).
        self.scaler = scaler if scaler is not None else getattr(optimizer, "scaler", None)
        if self.scaler is not None and not self.scaler.is_enabled():
            self.scaler = None  # GradScaler(enabled=False) is a no-op: no scaler at all
        # accelerate's AcceleratedScheduler holds the torch scheduler whose base_lrs a
        # rollback lowers: the session works on that one.
        self.scheduler = getattr(scheduler, "scheduler", scheduler)
        self._run_dir_given = run_dir is not None
        self.run_dir = (
            Path(run_dir)
            if run_dir is not None
            else Path("runs") / time.strftime("watch-%Y%m%d-%H%M%S")
        )
        self.ranks: RankGroup | None = None
        self.report = report
        self.console = console
        self.session: TraceSession | None = None
        self.summary: SessionSummary | None = None
        self.report_path: Path | None = None
        self.steps = 0
        self._handles: list = []
        self._loss_modules = _loss_modules(self.model)
        self._open = False

    # -- what a user reads afterwards ------------------------------------------------------
    @property
    def anomalies(self):
        return self._summary().anomalies

    @property
    def warnings(self):
        return self._summary().warnings

    @property
    def skipped_steps(self) -> list[int]:
        return self._summary().skipped_steps

    def _summary(self) -> SessionSummary:
        if self.session is not None:
            return self.session.summary
        return self.summary or SessionSummary()

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A NumericalAnomalyError is a stop every rank agreed on (one collective per
        # step): every rank is closing too. Any other error may be this rank's alone.
        agreed = exc is None or isinstance(exc, NumericalAnomalyError)
        self.close(failing=exc is not None, all_ranks=agreed)

    def start(self) -> Watch:
        if self.session is not None:
            return self
        trainable = trainable_of(self.optimizer)
        if not trainable:
            raise ConfigError(
                "stabilizer.watch: the optimizer holds no tensor that requires grad; pass "
                "the optimizer your loop steps"
            )
        self.ranks = _joined_ranks()
        if self.ranks is not None and not self._run_dir_given:
            # The default folder holds a timestamp: every rank writes into rank 0's.
            self.run_dir = Path(self.ranks.broadcast_text(str(self.run_dir)))
        if self.preflight != "off":
            if self.console is None:
                self.console = Console(stderr=True)
            self.preflight_report = preflight(self.model, self.optimizer, scaler=self.scaler)
            gate(self.preflight_report, mode=self.preflight, console=self._main_console())
        self.session = TraceSession(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainable=trainable,
            settings=self.settings,
            run_dir=self.run_dir,
            console=self.console,
            uses_grad_scaler=self.scaler is not None,
            meta=self._meta(trainable),
            ranks=self.ranks,
        )
        self.console = self.session.console
        if self.preflight_report is not None:
            self.session.preflight_causes = tuple(self.preflight_report.causes())
        tracer = self.session.tracer
        tracer.on_unbegun_step = self._begin
        tracer.on_forward_after_backward = self._forward_after_backward
        root = self.model
        self._handles += [
            root.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True),
            root.register_forward_hook(self._root_post, with_kwargs=True),
            self.optimizer.register_step_pre_hook(self._before_update),
            self.optimizer.register_step_post_hook(self._after_update),
        ]
        for module in self._loss_modules:
            self._handles += [
                module.register_forward_pre_hook(self._loss_pre, with_kwargs=True),
                module.register_forward_hook(self._loss_post, with_kwargs=True),
            ]
        where = str(self.session.store.path)
        if self.ranks is not None:
            where += f" (and one per rank, {self.ranks.world_size} ranks)"
        self._main_console().print(
            f"stabilizer: watching {len(tracer.modules)} modules and {len(trainable)} "
            f"trainable tensors into {where} (full statistics every "
            f"{self.settings.trace_every} step(s); {self.session.policy_text})"
        )
        self._reset_step()
        return self

    def close(self, *, failing: bool = False, all_ranks: bool = True) -> None:
        """End the last step, remove every hook, close the store, write the report.

        Under several processes rank 0 writes the report, which merges every rank's
        store. ``all_ranks``: every rank is closing now (the loop ended, or a stop all
        agreed on), so they wait for each other around the report; a rank that failed
        alone is not waited for: the others would never come.
        """
        session = self.session
        if session is None:
            return
        try:
            if self._open and not failing:
                self._end(scaler_skipped=self._scaler_stepped_without_update())
            if not failing:
                session.flush()  # the step still held when judging late: before "completed"
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.session = None
            self.summary = session.summary
            if not failing:
                session.store.set_meta(completed=True)
            session.close(failing=failing)
            # Rank 0 reads every rank's store, so it waits until all are closed; the
            # others wait for its report, since torchrun (under accelerate launch too)
            # ends the whole job as soon as the first rank exits.
            wait = all_ranks and self.ranks is not None
            if wait:
                self.ranks.barrier()
            if self.report and session.rank == 0:
                self._write_report()
            if wait:
                self.ranks.barrier()

    # -- the loss, the labels and the calls of a step ------------------------------------------
    def loss(self, loss: torch.Tensor, *, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Tell the watch this micro-batch's loss (one computed outside the model).

        ``labels``: the targets it was computed from (-100 masked), so that a NaN
        loss over a batch with no label token is named as such. Returns ``loss``.
        """
        if self.session is None or self.session.replaying:
            return loss
        if not self._open:
            self._begin()
        if not self._user_loss:
            self._user_loss = True
            self._losses.clear()  # the user's loss replaces what the model returned
        self._losses.append(loss.detach().float().reshape(()))
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
            self._labels.append((labels != IGNORE_INDEX).sum())
        return loss

    def _reset_step(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._calls: list[tuple[tuple, dict]] = []
        self._user_loss = False
        self._loss_stack: list[torch.Tensor | None] = []
        self._misused = False
        self._grad_scale: torch.Tensor | None = None
        self._scaler_states = self.scaler._per_optimizer_states if self.scaler else None

    def _training_call(self) -> bool:
        return self.session is not None and not self.session.replaying and torch.is_grad_enabled()

    def _root_pre(self, module, args, kwargs):
        if self.session is None or self.session.replaying:
            return None
        # Evaluation inside the loop (no_grad / inference_mode) is not a training step.
        self.session.tracer.recording = torch.is_grad_enabled()
        if not self.session.tracer.recording:
            return None
        self._forward_after_backward()
        if not self._open:
            self._begin()
        self._calls.append((args, dict(kwargs)))
        return None

    def _root_post(self, module, args, kwargs, output):
        if self.session is not None and not self.session.replaying:
            self.session.tracer.recording = True
        return None

    def _loss_pre(self, module, args, kwargs):
        if not self._training_call():
            return None
        self._loss_stack.append(None)
        labels = kwargs.get("labels")
        outermost = len(self._loss_stack) == 1 and not self._user_loss
        if outermost and isinstance(labels, torch.Tensor) and not labels.is_floating_point():
            self._labels.append((labels != IGNORE_INDEX).sum())
        return None

    def _loss_post(self, module, args, kwargs, output):
        if not self._training_call() or not self._loss_stack:
            return None
        inner = self._loss_stack.pop()
        loss = loss_of(output)
        loss = loss if loss is not None else inner
        if self._loss_stack:  # an inner module: its loss stands if the outer one has none
            self._loss_stack[-1] = loss
        elif loss is not None and not self._user_loss:
            self._losses.append(loss.detach().float().reshape(()))
        return None

    # -- step boundaries -------------------------------------------------------------------------
    def _begin(self) -> None:
        if self._open or self.session is None:
            return
        self._reset_step()
        self._open = True
        self.session.begin_step(self.steps)

    def _forward_after_backward(self) -> None:
        """A forward after a backward in an open step: the next micro-batch of gradient
        accumulation, or the first forward after a step the GradScaler skipped (its
        ``update()`` ran: no optimizer step will close that one)."""
        if self._open and self._scaler_stepped_without_update():
            self._end(scaler_skipped=True)
            self._begin()

    def _scaler_stepped_without_update(self) -> bool:
        # update() replaces the per-optimizer state dict: the step is over for the scaler.
        return self.scaler is not None and self.scaler._per_optimizer_states is not (
            self._scaler_states
        )

    def _before_update(self, optimizer, args, kwargs) -> None:
        session = self.session
        if session is None or session.replaying:
            return
        if not self._open:
            self._begin()
        if self.scaler is not None:
            from torch.amp.grad_scaler import OptState

            state = self.scaler._per_optimizer_states.get(id(self.optimizer))
            stage = state["stage"] if state else OptState.READY
            scale = getattr(self.scaler, "_scale", None)
            # scale() was used and nothing unscaled this optimizer's gradients. (Fused
            # optimizers get the scale and found_inf from scaler.step as attributes and
            # unscale inside their kernel: not a misuse.)
            fused_amp = getattr(optimizer, "found_inf", None) is not None
            self._misused = scale is not None and stage is OptState.READY and not fused_amp
            if scale is not None:
                self._grad_scale = scale.detach().clone()  # update() changes it in place
        if session.max_grad_norm is not None:
            # The clip policy lowered the bound: applied here, since the loop is yours.
            torch.nn.utils.clip_grad_norm_(trainable_of(self.optimizer), session.max_grad_norm)

    def _after_update(self, optimizer, args, kwargs) -> None:
        if self.session is None or self.session.replaying:
            return
        self._end(scaler_skipped=False)

    def _end(self, *, scaler_skipped: bool) -> None:
        session = self.session
        self._open = False
        tracer = session.tracer
        session.detector.context.compute_dtype = tracer.compute_dtype()
        extra: dict = {}
        if self._misused:
            extra["gradscaler_misuse"] = 1.0
        if self._grad_scale is not None:
            extra["grad_scale"] = self._grad_scale
        grads = tracer._param_device.get("grad_norm")
        grad_norm = torch.linalg.vector_norm(grads) if grads is not None else None
        loss = torch.stack(self._losses).mean() if self._losses else None
        label_tokens = torch.stack(self._labels).min() if self._labels else None
        step = self.steps
        self.steps += 1
        session.end_step(
            step,
            loss,
            grad_norm,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            label_tokens=label_tokens,
            recorded=self._recorded(),
            extra=extra,
            scaler_skipped=scaler_skipped,
        )

    def _recorded(self) -> RecordedStep:
        tracer = self.session.tracer
        autocast = None
        if tracer.autocast_dtype is not None:
            device = _first_device(self._calls) or "cpu"
            autocast = (device, tracer.autocast_dtype)
        why = None
        if not self._calls:
            why = "the model itself was not called this step (a custom forward of its parts)"
        # The user's divisor (gradient accumulation) is unknown: 1.0 changes the size of
        # the replayed gradients, not where they first go non-finite.
        return RecordedStep(
            calls=self._calls,
            autocast=autocast,
            loss_divisor=1.0,
            grad_scale=self._grad_scale,
            unscaled=not self._misused,
            why_not=why,
            forward_only="the loss was computed outside the model" if self._user_loss else None,
        )

    # -- the end --------------------------------------------------------------------------------
    def _main_console(self) -> Console:
        """The console for what every rank would say alike: rank 0's only."""
        if self.ranks is not None and not self.ranks.is_main:
            return Console(quiet=True)
        return self.console

    def _write_report(self) -> None:
        from stabilizer.reports import write_report

        try:
            self.report_path = write_report(self.run_dir)
        except Exception as err:  # a report failure must not hide the loop's own outcome
            self.console.print(
                f"[red]stabilizer: the report failed: {type(err).__name__}: {err}[/]"
            )
            return
        self.console.print(f"stabilizer: report written to {self.report_path}")

    def _meta(self, trainable) -> dict:
        dtypes = Counter(_SHORT_DTYPE.get(p.dtype, str(p.dtype)) for p in trainable)
        group = self.optimizer.param_groups[0]
        config = {
            "source": "stabilizer.watch",
            "model": type(self.model).__name__,
            "optimizer": type(self.optimizer).__name__,
            "adapter_dtype": dtypes.most_common(1)[0][0] if dtypes else None,
            "lr": group.get("lr"),
            "eps": group.get("eps") if isinstance(group.get("eps"), float) else None,
            "grad_scaler": self.scaler is not None,
            "on_anomaly": self.settings.on_anomaly,
            "on_warning": self.settings.on_warning,
            "judge_late": self.settings.judge_late,
            "trace_every": self.settings.trace_every,
            "probe": self.settings.probe,
        }
        return {
            "config": config,
            "completed": False,
            "run_name": self.run_dir.name,
            "source": "stabilizer.watch",
            "model_class": type(self.model).__name__,
        }


def watch(model: torch.nn.Module, optimizer, **options) -> Watch:
    """``with stabilizer.watch(model, optimizer, scaler=scaler) as watch:`` (see :class:`Watch`).

    Options: ``scaler`` (your GradScaler; None: none in this loop), ``scheduler``,
    ``run_dir``, ``on_anomaly`` (raise | skip | clip | rollback | warn | repair: the
    diagnosed fix applied in place, the step's update undone), ``max_repairs``,
    ``on_warning`` (warn | raise), ``judge_late`` (auto | on | off: with ``warn``,
    each step judged at the end of the next, so no step ends in a host-device sync;
    auto: on a GPU), ``trace_every``, ``probe`` (regex of module
    names), ``max_anomalies``, ``replay``, ``report``, ``tensorboard``, ``wandb`` (the same
    scalars and cards to an offline W&B run in the run folder), ``preflight``
    (stop | warn | off: the checks of ``stabilizer check`` on the model, optimizer and
    scaler at start; an error such as fp16 tensors under Adam with eps 1e-8 stops
    before step 0), ``console``.
    """
    return Watch(model, optimizer, **options)


# -- helpers ------------------------------------------------------------------------------------


def _as_argument(message: str) -> str:
    """Name watch()'s keyword, not the CLI option, in a settings error."""
    for option in (
        "--on-anomaly",
        "--on-warning",
        "--judge-late",
        "--trace-every",
        "--max-anomalies",
        "--max-repairs",
    ):
        message = message.replace(option, option.removeprefix("--").replace("-", "_"))
    return message.replace("--rollback-lr-factor", "rollback_lr_factor")


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / DataParallel (and accelerate's prepare, which returns DDP under several
    # processes) run the inner module's hooks: watch that one.
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"stabilizer.watch: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _joined_ranks() -> RankGroup | None:
    """The process group of a multi-process run (accelerate's, or the user's own under
    torchrun), None in one process. The watch joins it and never owns or destroys it:
    whoever initialised it (``Accelerator()``, ``init_process_group``) tears it down."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    _, _, local_rank = env_world()
    return RankGroup(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that really steps. accelerate's ``AcceleratedOptimizer`` is
    an Optimizer subclass that never runs torch's step hooks itself: it calls the
    wrapped one's ``step()`` (only on real updates under gradient accumulation)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "stabilizer.watch: optimizer must be a torch.optim.Optimizer (or accelerate's "
            f"wrapper of one), got {type(optimizer).__name__}"
        )
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _loss_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model and every submodule whose forward takes ``labels``: where a loss can
    come from (the model itself, or the LM a custom forward calls directly)."""
    found = []
    signatures: dict[type, bool] = {}
    for _, module in model.named_modules():
        cls = type(module)
        if cls not in signatures:
            try:
                signatures[cls] = "labels" in inspect.signature(cls.forward).parameters
            except (TypeError, ValueError):
                signatures[cls] = False
        if signatures[cls] or module is model:
            found.append(module)
    return found


def _first_device(calls) -> str | None:
    from torch.utils._pytree import tree_flatten

    for value in tree_flatten(calls)[0]:
        if isinstance(value, torch.Tensor):
            return value.device.type
    return None
