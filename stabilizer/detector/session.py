"""``--trace`` inside the training loop: probes, store, detector and policy, step by step.

    session = TraceSession(model=model, optimizer=optimizer, scheduler=scheduler,
                           trainable=trainable, settings=TraceSettings.from_train_config(cfg),
                           run_dir=run_dir, console=console, compute_dtype="float32",
                           uses_grad_scaler=False)
    for step ...:
        session.begin_step(step)
        loss, grad_norm = train_step(..., before_update=session.before_update)
        accepted = session.end_step(step, loss, grad_norm, micro_batches, lr)
        if accepted:
            scheduler.step()
    session.close()

Every action is logged in the store and printed. A skipped step is said out
loud (AMP's GradScaler skips silently), and ``max_anomalies`` stops the run
with the diagnosis instead of skipping forever.

Under torchrun (``ranks`` given) each rank traces its own replica into its own
store, and every step the ranks agree on one verdict (one small host-side
collective), so all of them take the same action in the same step. A rank that
only received a NaN through the gradient all-reduce records an "other-rank"
anomaly naming the rank where it was born.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.panel import Panel

from stabilizer.config import TraceSettings, TrainConfig
from stabilizer.data.collate import IGNORE_INDEX
from stabilizer.detector.detect import Detector, DetectorContext
from stabilizer.detector.diagnosis import CAUSES, Anomaly, make_anomaly
from stabilizer.detector.policy import ClampOutput, NumericalAnomalyError, StateSnapshot
from stabilizer.distributed import RankGroup, RankVerdict, StepAgreement
from stabilizer.probes.schema import PASSES, TENSOR_STATS
from stabilizer.probes.tracer import StepRecord, Tracer
from stabilizer.store import ModuleInfo, ParamInfo, StepData, TraceStore, store_path

_CAUSE_IDS = list(CAUSES)
_GRADSCALER_PATIENCE = 5  # consecutive AMP skips before a run counts it as an anomaly


@dataclass
class SessionSummary:
    anomalies: list[Anomaly] = field(default_factory=list)
    warnings: list[Anomaly] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    rolled_back_steps: list[int] = field(default_factory=list)
    bundle: Path | None = None


class TraceSession:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        trainable: list[torch.nn.Parameter],
        settings: TraceSettings,
        run_dir: Path,
        console: Console,
        compute_dtype: str,
        uses_grad_scaler: bool,
        meta: dict | None = None,
        resume_from: int | None = None,
        train_config: TrainConfig | None = None,
        ranks: RankGroup | None = None,
    ) -> None:
        """``train_config`` is what a repro bundle needs to rebuild the run (replay writes
        one only with it); ``meta`` goes into the store (the run's config); ``ranks`` is
        the torchrun group, None in a single process."""
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.settings = settings
        self.train_config = train_config
        self.console = console
        self.run_dir = run_dir
        self.uses_grad_scaler = uses_grad_scaler
        self.ranks = ranks
        self.rank = ranks.rank if ranks is not None else 0
        self.tracer = Tracer(
            model,
            optimizer=optimizer,
            pattern=settings.probe,
            trace_every=settings.trace_every,
            compile_stats=settings.compile_stats,
        ).attach()
        self.detector = Detector(
            self.tracer,
            DetectorContext(
                compute_dtype=compute_dtype,
                adam_eps=settings.adam_eps,
                uses_grad_scaler=uses_grad_scaler,
            ),
        )
        self.store = self._open_store(meta or {}, resume_from)
        self.policy = settings.on_anomaly
        # Replay needs the pre-step state, and a TrainConfig to rebuild the run from.
        replays = settings.replay and train_config is not None
        self.needs_snapshot = self.policy in ("skip", "clip", "rollback") or replays
        self.before = StateSnapshot(trainable, optimizer)
        self.good = StateSnapshot(trainable, optimizer)
        self.summary = SessionSummary()
        self._clamps: list[ClampOutput] = []
        self._amp_skips_in_a_row = 0
        self._clean_since_good = 0
        self.max_grad_norm = settings.max_grad_norm
        self._rng_before: torch.Tensor | None = None
        self.sink = self._open_tensorboard() if settings.tensorboard else None

    def _open_store(self, meta: dict, resume_from: int | None) -> TraceStore:
        path = store_path(self.run_dir, self.rank)
        if self.ranks is not None:
            meta = {**meta, "rank": self.rank, "world_size": self.ranks.world_size}
        if resume_from is not None and path.exists():
            store = TraceStore.create(path, meta=meta, append=True)
            store.delete_steps_after(resume_from - 1)
        else:
            store = TraceStore.create(path, meta=meta, overwrite=True)
        store.register_modules(
            [
                ModuleInfo(m.index, m.name, m.label, m.kind, m.layer, m.component, m.is_attention)
                for m in self.tracer.modules
            ]
        )
        store.register_params(
            [
                ParamInfo(p.index, p.name, p.label, p.module_index, p.numel, p.dtype)
                for p in self.tracer.params
            ]
        )
        return store

    # -- per step --------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.tracer.begin_step(step)
        if self.needs_snapshot:
            self.before.capture()
            self._rng_before = torch.get_rng_state()

    def before_update(self) -> None:
        self.tracer.measure_grads()

    def end_step(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor | float | None,
        micro_batches: list[dict[str, torch.Tensor]] | None,
        lr: float,
    ) -> tuple[bool, StepRecord]:
        """Check the step; apply the policy. Returns (accepted, record).

        ``micro_batches`` (the step's inputs) let the record count label tokens and the
        replay re-run the step; None when the caller does not have them (a Trainer).
        """
        extra = {}
        if micro_batches:
            extra["label_tokens"] = sum(
                (b["labels"] != IGNORE_INDEX).sum() for b in micro_batches if "labels" in b
            )
        record = self.tracer.end_step(loss=loss, lr=lr, grad_norm=grad_norm, extra=extra)
        anomaly = self.detector.check(record)
        if self.ranks is not None:
            anomaly = self._agree(anomaly, record)
        # An early warning says "nothing is non-finite yet": never beside an anomaly.
        for warning in self.detector.warnings(record) if anomaly is None else []:
            self.summary.warnings.append(warning)
            self._append_anomaly(warning)
            rank = f" (rank {self.rank})" if self.ranks is not None else ""
            self.console.print(f"[yellow]early warning{rank}:[/] {warning.card()}")
        status, accepted = "ok", True
        try:
            if anomaly is not None and self._is_amp_skip(anomaly, record):
                # GradScaler already refused the update; the schedule must not advance either.
                status, accepted = "skipped", False
            elif anomaly is not None:
                self._amp_skips_in_a_row = 0
                status, accepted = self._handle(anomaly, record, micro_batches)
        except NumericalAnomalyError:
            # The step that stops the run is the one a reader looks at first: keep it.
            self._append_step(_step_data(record, "stopped"))
            raise
        if anomaly is None:
            self._amp_skips_in_a_row = 0
            self._maybe_keep_good()
        self._append_step(_step_data(record, status))
        return accepted, record

    def _agree(self, local: Anomaly | None, record: StepRecord) -> Anomaly | None:
        """Every rank's verdict on this step; the anomaly this rank acts on (or None).

        All ranks get the same answer to "is this step kept?", so the policy acts on
        every replica alike. The rank(s) that saw the earliest pass go non-finite keep
        their own diagnosis; the others record that the NaN came from them.
        """
        mine = RankVerdict(
            rank=self.rank,
            anomalous=local is not None,
            pass_index=PASSES.index(local.pass_) if local is not None else len(PASSES),
            module_index=(
                local.module_index if local is not None and local.module_index is not None else -1
            ),
            cause_index=_CAUSE_IDS.index(local.cause) if local is not None else -1,
        )
        agreement = self.ranks.agree(mine)
        if not agreement.anomalous:
            return None
        origins = agreement.origin_ranks
        if self.rank in origins:
            anomaly = local
        else:
            anomaly = self._other_rank_anomaly(record.step, agreement, local)
        anomaly.evidence["rank"] = self.rank
        anomaly.evidence["first non-finite on rank(s)"] = origins
        anomaly.evidence["ranks with non-finite values"] = agreement.anomalous_ranks
        return anomaly

    def _other_rank_anomaly(
        self, step: int, agreement: StepAgreement, local: Anomaly | None
    ) -> Anomaly:
        origin = agreement.verdicts[agreement.origin_ranks[0]]
        module = ""
        if 0 <= origin.module_index < len(self.tracer.modules):
            module = f", first in {self.tracer.modules[origin.module_index].label}"
        anomaly = make_anomaly(
            step,
            origin.pass_,
            "other-rank",
            origin=origin.rank,
            origin_pass=origin.pass_,
            origin_module=module,
            origin_store=store_path(Path("."), origin.rank).name,
        )
        if 0 <= origin.cause_index < len(_CAUSE_IDS):
            anomaly.evidence["cause on that rank"] = _CAUSE_IDS[origin.cause_index]
        anomaly.evidence["on this rank"] = (
            local.headline() if local is not None else "every value was finite"
        )
        return anomaly

    def _append_step(self, data: StepData) -> None:
        self.store.append_step(data)
        if self.sink is not None:
            self.sink.write_step(data)

    def _append_anomaly(self, anomaly: Anomaly) -> None:
        row = _anomaly_row(anomaly, self.store)
        self.store.append_anomaly(**row)
        if self.sink is not None:
            self.sink.write_anomaly({**row, "pass": row["pass_"]})

    def _is_amp_skip(self, anomaly: Anomaly, record: StepRecord) -> bool:
        if not (self.uses_grad_scaler and anomaly.pass_ == "backward"):
            return False
        if record.optimizer_stepped:
            return False
        self._amp_skips_in_a_row += 1
        detail = (
            f"GradScaler skipped step {record.step}: non-finite gradients "
            f"(first in {anomaly.module or 'a parameter'}); {self._amp_skips_in_a_row} in a row"
        )
        self._log_action(record.step, "skip", detail)
        if self.rank == 0:
            self.console.print(f"[yellow]{detail}[/]")
        if self._amp_skips_in_a_row >= _GRADSCALER_PATIENCE:
            anomaly.evidence["GradScaler skips in a row"] = self._amp_skips_in_a_row
            self._record_anomaly(anomaly, record)
            raise NumericalAnomalyError(
                anomaly, "the GradScaler's scale keeps shrinking: every step overflows"
            )
        return True

    def _record_anomaly(self, anomaly: Anomaly, record: StepRecord) -> None:
        self.summary.anomalies.append(anomaly)
        self._append_anomaly(anomaly)

    def _handle(self, anomaly: Anomaly, record: StepRecord, micro_batches) -> tuple[str, bool]:
        first = not self.summary.anomalies
        replayable = micro_batches and self.train_config is not None and self.before.ready
        replayable = replayable and anomaly.cause != "other-rank"  # born elsewhere
        if first and self.settings.replay and replayable:
            self._replay(anomaly, record, micro_batches)
        self._record_anomaly(anomaly, record)
        if anomaly.cause != "other-rank":
            where = f" on rank {self.rank}" if self.ranks is not None else ""
            self.console.print(
                Panel(
                    anomaly.card(),
                    title=f"stabilizer: anomaly {len(self.summary.anomalies)}{where}",
                    border_style="red",
                )
            )
        elif self.rank == 0:
            self.console.print(f"[bold red]{anomaly.headline()}:[/] {anomaly.summary}")
        count = len(self.summary.anomalies)
        if self.policy == "raise":
            self._act(record.step, "raise", "stopping on the first anomaly (--on-anomaly raise)")
            raise NumericalAnomalyError(anomaly, f"training stopped at step {record.step}")
        if count > self.settings.max_anomalies:
            if self.policy in ("skip", "clip", "rollback"):
                self.before.restore()  # these policies never keep an anomalous update
                self.detector.weights_restored()
            self._act(
                record.step,
                "stop",
                f"{count} anomalies > --max-anomalies {self.settings.max_anomalies}",
            )
            raise NumericalAnomalyError(
                anomaly,
                f"training stopped at step {record.step}: {count} anomalies "
                f"(--max-anomalies {self.settings.max_anomalies}); the first diagnosis is in the store",
            )
        if self.policy == "warn":
            self._act(record.step, "warn", "update applied anyway (--on-anomaly warn)")
            return "anomaly", True
        if self.policy in ("skip", "clip"):
            self.before.restore()
            self.detector.weights_restored()
            self.summary.skipped_steps.append(record.step)
            self._act(
                record.step,
                "skip",
                f"step {record.step} skipped: its update was undone and the learning-rate "
                "schedule did not advance",
            )
            if self.policy == "clip":
                self._clip(anomaly, record)
            return "skipped", False
        # rollback
        if self.good.ready:
            self.good.restore()
        else:
            self.before.restore()
        self.detector.weights_restored()
        factor = self.settings.rollback_lr_factor
        self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
        # The schedule does not advance on this step, so the lower rate must also reach
        # the optimizer now: the very next step is the one that must not diverge again.
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.summary.rolled_back_steps.append(record.step)
        self._act(
            record.step,
            "rollback",
            f"restored the last good adapter and optimizer state; learning rate x"
            f"{self.settings.rollback_lr_factor} (peak now {self.scheduler.base_lrs[0]:.3g})",
        )
        return "rolled_back", False

    def _clip(self, anomaly: Anomaly, record: StepRecord) -> None:
        if anomaly.pass_ == "forward" and anomaly.module_index is not None:
            info = self.tracer.modules[anomaly.module_index]
            module = self.model.get_submodule(info.name)
            dtype = getattr(torch, self.detector.context.compute_dtype)
            bound = torch.finfo(dtype).max / 2
            self._clamps.append(ClampOutput(module, bound))
            self._act(record.step, "clip", f"clamping {info.label} output to +-{bound:.4g}")
        else:
            current = self.max_grad_norm or 1.0
            self.max_grad_norm = current / 2
            self._act(
                record.step, "clip", f"gradient-norm clip lowered to {self.max_grad_norm:.3g}"
            )

    def _maybe_keep_good(self) -> None:
        if self.policy != "rollback":
            return
        self._clean_since_good += 1
        if not self.good.ready or self._clean_since_good >= 20:
            self.good.copy_from(self.before) if self.before.ready else self.good.capture()
            self._clean_since_good = 0

    def _act(self, step: int, action: str, detail: str) -> None:
        self._log_action(step, action, detail)
        if self.rank == 0:  # every rank takes the same action: one of them says it
            self.console.print(f"[bold yellow]{action}:[/] {detail}")

    def _log_action(self, step: int, action: str, detail: str) -> None:
        self.store.append_action(step=step, action=action, detail=detail)
        if self.sink is not None:
            self.sink.write_action({"step": step, "action": action, "detail": detail})

    def _replay(self, anomaly: Anomaly, record: StepRecord, micro_batches) -> None:
        from stabilizer.detector.replay import replay_step

        started = time.perf_counter()
        try:
            result = replay_step(
                model=self.model,
                optimizer=self.optimizer,
                before=self.before,
                micro_batches=micro_batches,
                anomaly=anomaly,
                tracer=self.tracer,
                rng_state=self._rng_before,
                run_dir=self.run_dir,
                cfg=self.train_config,
            )
        except Exception as exc:  # a failed replay must not hide the anomaly itself
            anomaly.evidence["replay"] = f"failed: {type(exc).__name__}: {exc}"
            return
        anomaly.evidence["replay seconds"] = round(time.perf_counter() - started, 2)
        if result is not None and result.bundle is not None:
            self.summary.bundle = result.bundle
            self._act(record.step, "replay", f"repro bundle saved to {result.bundle}")

    def close(self) -> None:
        for clamp in self._clamps:
            clamp.remove()
        self._clamps.clear()
        self.tracer.close()
        self.store.close()
        if self.sink is not None:
            self.sink.close()

    def _open_tensorboard(self):
        from stabilizer.reports.tensorboard import TensorBoardSink

        log_dir = self.run_dir / "tensorboard" / f"rank{self.rank}"
        return TensorBoardSink(log_dir, self.store.modules(), self.store.params())


def _step_data(record: StepRecord, status: str) -> StepData:
    stats = record.stats
    if stats is None:
        # Between full steps only finiteness is known: keep the modules that failed it.
        stats, fire_order = {}, {}
        for site, finite in record.finite.items():
            if finite.all():
                continue
            rows = np.full((len(finite), len(TENSOR_STATS)), np.nan)
            rows[~finite, TENSOR_STATS.index("nan")] = 1.0
            stats[site] = rows
            fire_order[site] = np.where(finite, -1, record.order[site]).astype("int64")
    else:
        fire_order = {site: order.astype("int64") for site, order in record.order.items()}
    return StepData(
        step=record.step,
        loss=record.loss,
        lr=record.lr if record.lr is not None else math.nan,
        grad_norm=record.grad_norm,
        status=status,
        full=record.full,
        module_stats=stats,
        fire_order=fire_order,
        score_max=record.score_max,
        param_stats=record.param_stats,
        extra={k: v for k, v in record.extra.items()},
    )


def _anomaly_row(anomaly: Anomaly, store: TraceStore) -> dict:
    return {
        "step": anomaly.step,
        "pass_": anomaly.pass_,
        "module_id": anomaly.module_index,
        "op": anomaly.op,
        "cause": anomaly.cause,
        "summary": anomaly.summary,
        "fix": anomaly.fix,
        "evidence": {
            **anomaly.evidence,
            "module": anomaly.module,
            "warning": anomaly.warning,
            "module_path": anomaly.module_path,
        },
    }
