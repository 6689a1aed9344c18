"""From a step's record to a diagnosis: which pass, which module first, and why.

    >>> detector = Detector(tracer, context=DetectorContext(adam_eps=1e-8))
    >>> anomaly = detector.check(record)           # None when the step is clean
    >>> print(anomaly.card())
    NaN/Inf at step 0, optimizer pass
      cause:  the weights went non-finite inside the optimizer step while every gradient ...

The first offender of a pass is the first module, in the order its hooks fired,
whose input was finite and whose output was not. Passes are checked in the order
they run (input, forward, loss, backward, optimizer), so the earliest failure
in a step is the one named. Weights that went bad in an earlier optimizer step
are remembered, so a later forward NaN is not blamed on the module that merely
uses them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from stabilizer.detector.diagnosis import Anomaly, make_anomaly
from stabilizer.probes.schema import PARAM_STATS, TENSOR_STATS
from stabilizer.probes.tracer import StepRecord, Tracer

FP16_MAX = 65504.0
FP16_SMALLEST = 5.96e-8  # smallest fp16 subnormal: anything below rounds to 0
_LIMITS = {"float16": FP16_MAX, "bfloat16": 3.3895e38, "float32": 3.4028e38}
_STAT = {name: i for i, name in enumerate(TENSOR_STATS)}
_PSTAT = {name: i for i, name in enumerate(PARAM_STATS)}


def _scaler_misused(record: StepRecord) -> bool:
    """The step applied gradients a GradScaler scaled and nobody unscaled."""
    return record.extra.get("gradscaler_misuse", 0.0) > 0


@dataclass
class DetectorContext:
    """What the detector knows about the run beyond the record."""

    compute_dtype: str = "float32"  # the dtype activations are computed in
    adam_eps: float | None = None
    uses_grad_scaler: bool = False
    warn_fraction: float = 0.5  # early warning when abs-max passes this fraction of the limit
    overflow_horizon: float = 5.0  # ...or when its steady growth reaches the limit this soon
    growth_window: int = 8  # full-stat steps over which steady growth is judged
    growth_factor: float = 8.0
    growth_floor: float = 1.0  # steady growth below this abs-max is not called divergence


class Detector:
    def __init__(self, tracer: Tracer, context: DetectorContext | None = None) -> None:
        self.tracer = tracer
        self.context = context or DetectorContext()
        self.modules = tracer.modules
        self.params = tracer.params
        self.bad_weights_since: dict[int, int] = {}  # param index -> step it went non-finite
        self._history: deque[StepRecord] = deque(maxlen=max(8, self.context.growth_window))
        self._losses: deque[float] = deque(maxlen=50)
        self._warned: set[tuple[str, int | None]] = set()
        self._first_weights: tuple[int, float] | None = None  # (step, total weight norm)
        self._last_weight_norm: float | None = None
        # The first unstable-update warning (an update far larger than the weights): an
        # overflow after it is its consequence, and is diagnosed as such.
        self.unstable_update: Anomaly | None = None

    # -- the check ---------------------------------------------------------------------
    def check(self, record: StepRecord) -> Anomaly | None:
        """The first failure of this step, or None. Updates the detector's memory."""
        anomaly = (
            self._input(record)
            or self._forward(record)
            or self._loss(record)
            or self._backward(record)
            or self._optimizer(record)
        )
        if anomaly is not None and _scaler_misused(record):
            anomaly = self._misuse(record, anomaly)
        self._remember_bad_weights(record)
        self._remember_first_weights(record)
        if anomaly is None:
            self._history.append(record)
            if record.loss_finite:
                self._losses.append(record.loss)
        return anomaly

    def weights_restored(self) -> None:
        """The policy put the trainable tensors back (skip, clip, rollback): forget the
        bad weights that are finite again, so that a later step that corrupts them is
        reported as new instead of being taken for the one already reported."""
        tensors = self.tracer._param_tensors
        for i in list(self.bad_weights_since):
            if bool(torch.isfinite(tensors[i]).all()):
                del self.bad_weights_since[i]

    def warnings(self, record: StepRecord) -> list[Anomaly]:
        """Early warnings (nothing non-finite yet); each module/kind is reported once."""
        found = []
        unstable = self._unstable_update(record)
        if unstable and self.unstable_update is None:
            self.unstable_update = unstable[0]
        for warning in unstable + self._near_limit(record) + self._divergence(record):
            key = (warning.cause, warning.module_index)
            if key not in self._warned:
                self._warned.add(key)
                found.append(warning)
        return _one_per_cause(found)

    def update_repaired(self) -> None:
        """The unstable update was undone (the state before it restored): forget it."""
        self.unstable_update = None

    # -- passes ----------------------------------------------------------------------------
    def _input(self, record: StepRecord) -> Anomaly | None:
        bad = [name for name, ok in record.inputs_finite.items() if not ok]
        if not bad:
            return None
        anomaly = make_anomaly(record.step, "input", "nonfinite-input")
        anomaly.evidence["non-finite inputs"] = bad
        return anomaly

    def _forward(self, record: StepRecord) -> Anomaly | None:
        bad_out = [i for i in np.flatnonzero(~record.finite["fwd_out"])]
        if not bad_out:
            return None
        ordered = sorted(bad_out, key=lambda i: record.order["fwd_out"][i])
        emerged = [i for i in ordered if record.finite["fwd_in"][i]]
        index = int(emerged[0] if emerged else ordered[0])
        info = self.modules[index]
        # Weights that went bad in an earlier optimizer step explain any forward NaN
        # after it, whichever module shows it first.
        since = self._bad_weights_of(index)
        if since is None and self.bad_weights_since:
            since = min(self.bad_weights_since.values())
        if since is not None:
            anomaly = make_anomaly(record.step, "forward", "weights-already-nonfinite", since=since)
            anomaly.evidence["non-finite trainable tensors"] = len(self.bad_weights_since)
        elif not emerged:
            # Every non-finite output had a non-finite input: the value was born in an
            # op between probed modules or in a module that is not probed.
            anomaly = make_anomaly(record.step, "forward", "unprobed-origin", label=info.label)
        elif self._is_half() and (after := self._after_growth(record.step, "forward")):
            anomaly = after
        elif info.is_attention and self._is_half():
            score = self._score(record, index)
            anomaly = make_anomaly(
                record.step,
                "forward",
                "attention-overflow",
                dtype=self.context.compute_dtype,
                score=score,
                limit=self._limit(),
            )
        elif self._is_half():
            absmax = self._last_stat(index, "fwd_out", "absmax")
            anomaly = make_anomaly(
                record.step,
                "forward",
                "activation-overflow",
                dtype=self.context.compute_dtype,
                absmax=absmax,
                limit=self._limit(),
            )
        elif self._overflowed(record, index):
            anomaly = self._overflow(record.step, op="")
        else:
            anomaly = make_anomaly(
                record.step, "forward", "forward-math", dtype=self.context.compute_dtype
            )
        self._locate(anomaly, index)
        anomaly.evidence["input finite"] = bool(record.finite["fwd_in"][index])
        anomaly.evidence["non-finite modules in forward"] = len(bad_out)
        self._add_stats(anomaly, record, index, ("fwd_in", "fwd_out"))
        self._add_trend(anomaly, index)
        self._add_weights(anomaly, record, index)
        return anomaly

    def _loss(self, record: StepRecord) -> Anomaly | None:
        if record.loss_finite:
            return None
        label_tokens = record.extra.get("label_tokens")
        if label_tokens is not None and label_tokens == 0:
            anomaly = make_anomaly(record.step, "loss", "all-labels-masked")
            anomaly.evidence["label tokens in batch"] = 0
        elif (after := self._after_unstable_update(record.step, "loss")) is not None:
            anomaly = after
        elif (growth := self.weight_growth()) is not None and growth[1] >= 10.0:
            # Finite activations, an infinite loss, weights many times what they were:
            # the loss of a diverged model overflowed.
            anomaly = make_anomaly(
                record.step,
                "loss",
                "divergence-overflow",
                dtype="the loss's dtype",
                op=" in the loss",
                growth=growth[1],
                since=growth[0],
            )
        else:
            anomaly = make_anomaly(record.step, "loss", "loss-overflow")
        if anomaly.cause != "all-labels-masked" and label_tokens is not None:
            anomaly.evidence["label tokens in batch"] = int(label_tokens)
        anomaly.evidence["loss"] = record.loss
        return anomaly

    def _backward(self, record: StepRecord) -> Anomaly | None:
        bad_in = list(np.flatnonzero(~record.finite["grad_in"]))
        bad_out = list(np.flatnonzero(~record.finite["grad_out"]))
        if not bad_in and not bad_out:
            if record.grads_finite:
                return None
            bad = [
                i for i, row in enumerate(record.param_stats) if row[_PSTAT["grad_nonfinite"]] > 0
            ]
            anomaly = make_anomaly(record.step, "backward", "grad-nonfinite")
            anomaly.evidence["parameters with non-finite gradient"] = [
                self.params[i].name for i in bad
            ]
            return anomaly
        # The module whose incoming gradient (w.r.t. its output) was finite and whose
        # outgoing gradient (w.r.t. its input) was not: its own backward made it.
        emerged = [i for i in bad_in if record.finite["grad_out"][i]]
        if emerged:
            index = int(min(emerged, key=lambda i: record.order["grad_in"][i]))
        else:
            index = int(min(bad_out, key=lambda i: record.order["grad_out"][i]))
        info = self.modules[index]
        if (after := self._after_growth(record.step, "backward")) is not None:
            anomaly = after  # the weights' growth, not this module, made the gradient overflow
        elif info.name.endswith("LayerNorm") or "layernorm" in info.name.lower():
            rms = self._last_stat(index, "fwd_in", "rms")
            mean = self._last_stat(index, "fwd_in", "mean")
            anomaly = make_anomaly(
                record.step,
                "backward",
                "layernorm-backward",
                rms=rms,
                mean=abs(mean) if math.isfinite(mean) else mean,
                dtype=self.context.compute_dtype,
            )
        else:
            anomaly = make_anomaly(record.step, "backward", "backward-overflow")
        self._locate(anomaly, index)
        anomaly.evidence["forward finite"] = True
        anomaly.evidence["incoming gradient finite"] = bool(record.finite["grad_out"][index])
        self._add_stats(anomaly, record, index, ("fwd_in", "grad_out", "grad_in"))
        return anomaly

    def _optimizer(self, record: StepRecord) -> Anomaly | None:
        if record.params_finite:
            return None
        bad = [i for i, row in enumerate(record.param_stats) if row[_PSTAT["weight_nonfinite"]] > 0]
        newly_bad = [i for i in bad if i not in self.bad_weights_since]
        if not newly_bad:
            return None  # reported at the step they went bad
        dtypes = sorted({self.params[i].dtype for i in newly_bad})
        eps = self.context.adam_eps
        if "float16" in dtypes and eps is not None and eps < FP16_SMALLEST:
            anomaly = make_anomaly(record.step, "optimizer", "fp16-adam-eps", eps=eps)
        else:
            anomaly = make_anomaly(record.step, "optimizer", "optimizer-nonfinite")
        grad_norms = record.param_stats[:, _PSTAT["grad_norm"]]
        zero_grad = [self.params[i].name for i in newly_bad if grad_norms[i] == 0]
        # Lead with a tensor whose gradient was exactly zero: 0/0 is the signature.
        newly_bad.sort(key=lambda i: (grad_norms[i] != 0, i))
        anomaly.evidence["gradients finite"] = record.grads_finite
        anomaly.evidence["parameters non-finite after the step"] = (
            f"{len(newly_bad)} of {len(self.params)}"
        )
        anomaly.evidence["their dtypes"] = dtypes
        anomaly.evidence["examples"] = [self.params[i].name for i in newly_bad[:4]]
        if zero_grad:
            anomaly.evidence["non-finite with an exactly-zero gradient"] = len(zero_grad)
        first = newly_bad[0]
        anomaly.module = self.params[first].label
        anomaly.module_path = self.params[first].name
        anomaly.module_index = self.params[first].module_index
        return anomaly

    # -- early warnings ------------------------------------------------------------------
    def _unstable_update(self, record: StepRecord) -> list[Anomaly]:
        """An update far larger than the weights: finite still, but training is lost."""
        overall = record.extra.get("update_ratio_all", math.nan)
        if not (math.isfinite(overall) and overall > 1.0):
            return []
        if _scaler_misused(record):
            anomaly = self._misuse_anomaly(record.step, "optimizer", record, "finite, but huge")
        elif any(p.dtype == "float16" for p in self.params):
            # fp16 AdamW state: g*g below 6e-8 flushes to 0, so Adam divides the
            # momentum by eps alone (fused kernels avoid the 0/0 but not this).
            anomaly = make_anomaly(record.step, "optimizer", "fp16-adam-underflow", ratio=overall)
        else:
            scaler = (
                "while the GradScaler was used correctly"
                if self.context.uses_grad_scaler
                else "with no GradScaler in this loop"
            )
            anomaly = make_anomaly(
                record.step, "optimizer", "update-too-large", ratio=overall, scaler=scaler
            )
        anomaly.evidence["update / weights (all trainable tensors)"] = overall
        ratios = record.param_stats[:, _PSTAT["update_ratio"]]
        if np.isfinite(ratios).any():
            worst = int(np.nanargmax(ratios))
            anomaly.module = self.params[worst].label
            anomaly.module_path = self.params[worst].name
            anomaly.module_index = self.params[worst].module_index
            anomaly.evidence["largest single-tensor ratio"] = float(ratios[worst])
        anomaly.warning = True
        return [anomaly]

    def _near_limit(self, record: StepRecord) -> list[Anomaly]:
        """Modules whose values are near the 16-bit limit, or whose steady growth
        reaches it within ``overflow_horizon`` steps: the warning comes before the Inf."""
        if not self._is_half() or record.stats is None:
            return []
        limit = self._limit()
        now = _peak_values(record)
        previous = [r for r in self._history if r.stats is not None and r.step < record.step]
        rates = _growth_rates([(r.step, _peak_values(r)) for r in previous[-2:]], record.step, now)
        with np.errstate(divide="ignore", invalid="ignore"):
            steps_left = np.where(
                np.isnan(rates), np.inf, np.log(limit / np.maximum(now, 1e-30)) / np.log(rates)
            )
        near = now > limit * self.context.warn_fraction
        # Growth far below the limit is an adapter learning (lora_B starts at 0 and its
        # output grows by orders of magnitude early on): project only near the limit.
        heading = (now > limit * 1e-3) & (steps_left <= self.context.overflow_horizon)
        warnings = []
        for i in np.flatnonzero(near | heading):
            value, rate = float(now[i]), float(rates[i])
            anomaly = make_anomaly(
                record.step,
                "forward",
                "near-overflow",
                label=self.modules[i].label,
                dtype=self.context.compute_dtype,
                absmax=value,
                limit=limit,
            )
            if not math.isnan(rate):
                anomaly.evidence["growth per step"] = f"x{rate:.3g}"
                anomaly.evidence["steps to the limit at this growth"] = max(
                    0, math.ceil(float(steps_left[i]))
                )
            anomaly.warning = True
            self._locate(anomaly, int(i))
            warnings.append(anomaly)
        return warnings

    def _divergence(self, record: StepRecord) -> list[Anomaly]:
        out = []
        if record.loss_finite and len(self._losses) >= 20:
            median = float(np.median(list(self._losses)[-20:]))
            if median > 0 and record.loss > 4 * median:
                out.append(
                    self._divergence_warning(
                        record, f"the loss jumped to {record.loss:.4g} (recent median {median:.4g})"
                    )
                )
        full = [r for r in self._history if r.stats is not None]
        window = self.context.growth_window
        if len(full) >= window and record.stats is not None:
            series = np.stack([r.stats["fwd_out"][:, _STAT["absmax"]] for r in full[-window:]])
            rising = np.all(np.diff(series, axis=0) > 0, axis=0)
            grown = series[-1] > self.context.growth_factor * np.maximum(series[0], 1e-30)
            # A LoRA B output starts at exactly 0 and grows while the adapter learns: growth
            # from nothing, or to values far from any limit, is training, not divergence.
            meaningful = (series[0] > 0) & (series[-1] >= self.context.growth_floor)
            for i in np.flatnonzero(rising & grown & meaningful):
                warning = self._divergence_warning(
                    record,
                    f"{self.modules[i].label} abs-max grew every step for {window} traced steps "
                    f"({series[0, i]:.3g} -> {series[-1, i]:.3g})",
                )
                self._locate(warning, int(i))
                out.append(warning)
        return out

    def _divergence_warning(self, record: StepRecord, what: str) -> Anomaly:
        anomaly = make_anomaly(record.step, "forward", "divergence", what=what)
        anomaly.warning = True
        return anomaly

    # -- causes that need more than one pass's view ------------------------------------------
    def _misuse_anomaly(self, step: int, pass_: str, record: StepRecord, effect: str) -> Anomaly:
        scale = record.extra.get("grad_scale", math.nan)
        anomaly = make_anomaly(
            step,
            pass_,
            "gradscaler-misuse",
            scale=scale if math.isfinite(scale) else 65536.0,
            effect=effect,
        )
        anomaly.evidence["GradScaler state at the optimizer step"] = (
            "scale() used, never unscaled (no unscale_/step for this optimizer)"
        )
        return anomaly

    def _misuse(self, record: StepRecord, found: Anomaly) -> Anomaly:
        """A backward or optimizer NaN/Inf in a step that applied scaled gradients: the
        misuse is the cause; where the value went non-finite is kept as evidence."""
        if found.pass_ not in ("backward", "optimizer"):
            return found
        effect = (
            "gradients overflowed in the scaled backward and were written into the weights"
            if found.pass_ == "backward"
            else "the weights went non-finite"
        )
        anomaly = self._misuse_anomaly(found.step, found.pass_, record, effect)
        anomaly.module, anomaly.module_path = found.module, found.module_path
        anomaly.module_index = found.module_index
        anomaly.evidence["first non-finite"] = found.headline()
        anomaly.evidence.update(found.evidence)
        return anomaly

    def _overflowed(self, record: StepRecord, index: int) -> bool:
        """A full step's offender output held Inf and no NaN: an overflow, not 0/0."""
        if record.stats is None:
            return False
        row = record.stats["fwd_out"][index]
        return row[_STAT["inf"]] > 0 and row[_STAT["nan"]] == 0

    def _overflow(self, step: int, *, op: str) -> Anomaly:
        """An fp32 (or bf16) overflow: divergence when the weights grew by orders of
        magnitude since the first step, else values too large for the dtype."""
        growth = self.weight_growth()
        dtype = self.context.compute_dtype
        if growth is not None and growth[1] >= 10.0:
            return make_anomaly(
                step,
                "forward",
                "divergence-overflow",
                dtype=dtype,
                op=op,
                growth=growth[1],
                since=growth[0],
            )
        return make_anomaly(step, "forward", "float-overflow", dtype=dtype, op=op)

    def _after_unstable_update(self, step: int, pass_: str) -> Anomaly | None:
        """An overflow after fp16 Adam state made an update far larger than the weights
        is that update's consequence: the cause to fix is the fp16 optimizer state."""
        earlier = self.unstable_update
        if earlier is None or earlier.step >= step or earlier.cause != "fp16-adam-underflow":
            return None
        ratio = earlier.evidence.get("update / weights (all trainable tensors)", math.nan)
        anomaly = make_anomaly(
            step,
            pass_,
            "fp16-adam-overflow",
            dtype=self.context.compute_dtype if pass_ == "forward" else "the loss's dtype",
            since=earlier.step,
            ratio=ratio,
        )
        anomaly.evidence["unstable update"] = f"step {earlier.step}: {ratio:.3g}x the weights"
        return anomaly

    def _after_growth(self, step: int, pass_: str) -> Anomaly | None:
        """A 16-bit overflow that the weights' growth explains (fp16 Adam's jumps, or a
        learning rate that diverges), rather than values this dtype cannot hold."""
        if (after := self._after_unstable_update(step, pass_)) is not None:
            return after
        growth = self.weight_growth()
        if growth is not None and growth[1] >= 10.0:
            return make_anomaly(
                step,
                pass_,
                "divergence-overflow",
                dtype=self.context.compute_dtype,
                op="",
                growth=growth[1],
                since=growth[0],
            )
        return None

    def weight_growth(self) -> tuple[int, float] | None:
        """(first step, total trainable weight norm now / then), from the last record."""
        if self._first_weights is None or self._last_weight_norm is None:
            return None
        step, first = self._first_weights
        return step, self._last_weight_norm / first if first > 0 else math.inf

    def refine(self, anomaly: Anomaly, op: dict | None) -> Anomaly:
        """Sharpen a forward diagnosis with the exact op the replay found.

        Returns the anomaly to report (a new one when the op changes the cause; where,
        the evidence and the op are carried over)."""
        if op is None or anomaly.pass_ != "forward":
            return anomaly
        if anomaly.cause not in ("forward-math", "float-overflow", "unprobed-origin"):
            return anomaly
        name = f" (op {op['op']})"
        if op.get("masked_rows"):
            better = make_anomaly(
                anomaly.step, "forward", "masked-softmax-row", op=op["op"], rows=op["masked_rows"]
            )
        elif op.get("kind") == "overflow" and not self._is_half():
            better = self._overflow(anomaly.step, op=name)
        else:
            return anomaly
        better.module, better.module_path = anomaly.module, anomaly.module_path
        better.module_index, better.op = anomaly.module_index, anomaly.op
        better.evidence = {"first diagnosed as": anomaly.cause, **anomaly.evidence}
        return better

    # -- helpers ----------------------------------------------------------------------------
    def _is_half(self) -> bool:
        return self.context.compute_dtype in ("float16", "bfloat16")

    def _limit(self) -> float:
        return _LIMITS.get(self.context.compute_dtype, _LIMITS["float32"])

    def _score(self, record: StepRecord, index: int) -> float:
        if record.score_max is not None and math.isfinite(record.score_max[index]):
            return float(record.score_max[index])
        for past in reversed(self._history):
            if past.score_max is not None and math.isfinite(past.score_max[index]):
                return float(past.score_max[index])
        return math.nan

    def _last_stat(self, index: int, site: str, stat: str) -> float:
        for past in reversed(self._history):
            if past.stats is not None:
                value = past.stats[site][index, _STAT[stat]]
                if math.isfinite(value):
                    return float(value)
        return math.nan

    def _bad_weights_of(self, module_index: int) -> int | None:
        prefix = self.modules[module_index].name
        steps = [
            since
            for p, since in self.bad_weights_since.items()
            if self.params[p].name.startswith(prefix + ".")
            or self.params[p].module_index == module_index
        ]
        return min(steps) if steps else None

    def _remember_first_weights(self, record: StepRecord) -> None:
        norms = record.param_stats[:, _PSTAT["weight_norm"]]
        if not len(norms) or not np.isfinite(norms).all():
            return
        total = float(np.sqrt(np.square(norms.astype(np.float64)).sum()))
        self._last_weight_norm = total
        if self._first_weights is None:
            self._first_weights = (record.step, total)

    def _remember_bad_weights(self, record: StepRecord) -> None:
        column = record.param_stats[:, _PSTAT["weight_nonfinite"]]
        for i in np.flatnonzero(np.nan_to_num(column) > 0):
            self.bad_weights_since.setdefault(int(i), record.step)

    def _locate(self, anomaly: Anomaly, index: int) -> None:
        info = self.modules[index]
        anomaly.module = info.label
        anomaly.module_path = info.name
        anomaly.module_index = index

    def _add_stats(self, anomaly: Anomaly, record: StepRecord, index: int, sites) -> None:
        if record.stats is None:
            return
        for site in sites:
            row = record.stats[site][index]
            if np.isnan(row).all():
                continue
            anomaly.evidence[f"{site} now"] = {
                name: float(row[i]) for i, name in enumerate(TENSOR_STATS)
            }

    def _add_trend(self, anomaly: Anomaly, index: int) -> None:
        full = [r for r in self._history if r.stats is not None][-5:]
        if not full:
            return
        anomaly.evidence["fwd_out abs-max, last traced steps"] = [
            float(r.stats["fwd_out"][index, _STAT["absmax"]]) for r in full
        ]

    def _add_weights(self, anomaly: Anomaly, record: StepRecord, index: int) -> None:
        own = [
            p
            for p in self.params
            if p.module_index == index or p.name.startswith(self.modules[index].name + ".")
        ]
        if own:
            anomaly.evidence["trainable weight norms"] = [
                float(record.param_stats[p.index, _PSTAT["weight_norm"]]) for p in own
            ]


def _one_per_cause(warnings: list[Anomaly]) -> list[Anomaly]:
    """One warning per cause and pass in a step: a growing model trips the same warning
    in dozens of modules at once, and one card naming the first (in execution order)
    and counting the rest reads better than dozens of cards."""
    groups: dict[tuple[str, str], list[Anomaly]] = {}
    for warning in warnings:
        groups.setdefault((warning.cause, warning.pass_), []).append(warning)
    out = []
    for group in groups.values():
        first, rest = group[0], group[1:]
        if rest:
            names = [w.module for w in rest if w.module][:4]
            more = len(rest) - len(names)
            first.evidence["also in"] = f"{len(rest)} more module(s): {', '.join(names)}" + (
                f" and {more} more" if more else ""
            )
        out.append(first)
    return out


def _peak_values(record: StepRecord) -> np.ndarray:
    """Per module: the larger of its output's abs-max and its q·k product (0 if unseen)."""
    values = np.nan_to_num(record.stats["fwd_out"][:, _STAT["absmax"]], nan=0.0, posinf=0.0)
    if record.score_max is not None:
        scores = np.nan_to_num(record.score_max, nan=0.0, posinf=0.0)
        values = np.maximum(values, scores)
    return values


def _growth_rates(past: list[tuple[int, np.ndarray]], step: int, now: np.ndarray) -> np.ndarray:
    """Per module, the per-step growth factor where the value rose at each of the last
    two full-statistics steps (geometric mean over them); NaN elsewhere."""
    rates = np.full(now.shape, np.nan)
    if len(past) < 2:
        return rates
    points = [*past, (step, now)]
    rising = np.ones(now.shape, dtype=bool)
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        rising &= (v0 > 0) & (v1 > v0 * 1.01) & (s1 > s0)
    first_step, first = points[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        grown = (now / first) ** (1.0 / (step - first_step))
    return np.where(rising & (grown > 1.0), grown, np.nan)
