"""Causes of NaN/Inf in Q-Former LoRA training, each with the fix a user acts on.

The catalogue follows shared/reference/nan-signatures.md: what each known cause
looks like from inside a step (which pass first goes non-finite, and the
evidence around it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cause:
    id: str
    title: str
    fix: str


CAUSES: dict[str, Cause] = {
    c.id: c
    for c in [
        Cause(
            "nonfinite-input",
            "the batch itself holds NaN/Inf, before any module ran",
            "Find the sample in the repro bundle (batch.safetensors) and fix or drop it; "
            "check how images/features are produced",
        ),
        Cause(
            "fp16-adam-eps",
            "the weights went non-finite inside the optimizer step while every gradient was "
            "finite: adapters and AdamW state are fp16, where eps={eps:g} rounds to 0, and "
            "lora_A's first gradient is exactly 0 (lora_B starts at 0), so Adam computes 0/0",
            "Keep the adapters and their optimizer state in fp32 (--adapter-dtype fp32, the "
            "default; peft upcasts them unless the model is cast with .half() after "
            "get_peft_model), or train in bf16; with fp16 weights an eps >= 1e-4 avoids 0/0",
        ),
        Cause(
            "optimizer-nonfinite",
            "the weights went non-finite inside the optimizer step while every gradient was finite",
            "Check the optimizer's dtype and hyper-parameters (eps, lr); keep trainable "
            "tensors and optimizer state in fp32",
        ),
        Cause(
            "update-too-large",
            "the optimizer update was {ratio:.3g} times the weights (a healthy step is < 0.01) "
            "{scaler}: the learning rate is far too high for these weights, and training "
            "diverges from here",
            "Lower the learning rate (--lr) or add warm-up, and clip the gradient norm "
            "(--max-grad-norm)",
        ),
        Cause(
            "gradscaler-misuse",
            "the optimizer stepped on gradients the GradScaler had scaled (x{scale:g}) and "
            "nobody unscaled: optimizer.step() was called instead of scaler.step(optimizer), "
            "so the update is applied to scaled gradients ({effect})",
            "After scaler.scale(loss).backward() call scaler.step(optimizer) and "
            "scaler.update() (scaler.unscale_(optimizer) first if you clip gradients); "
            "never optimizer.step() on scaled gradients",
        ),
        Cause(
            "fp16-adam-underflow",
            "the optimizer update was {ratio:.3g} times the weights (a healthy step is < 0.01) "
            "with fp16 trainable tensors: AdamW's squared-gradient average is fp16 too, where "
            "g*g below 6e-8 flushes to 0, so the update divides the momentum by eps alone and "
            "the adapters jump; NaN/Inf follows within a few steps",
            "Keep the adapters and their optimizer state in fp32 (--adapter-dtype fp32, the "
            "default; with Trainer do not call model.half() after get_peft_model), or train "
            "in bf16",
        ),
        Cause(
            "fp16-adam-overflow",
            "a value overflowed {dtype} from finite inputs after AdamW's fp16 state made the "
            "update of step {since} {ratio:.3g} times the weights (g*g below 6e-8 flushes to 0 "
            "in fp16, so the update was momentum/eps and the adapters jumped): this overflow "
            "is the consequence of that update, not of this step's values",
            "Keep the adapters and their optimizer state in fp32 (--adapter-dtype fp32, the "
            "default; with Trainer do not call model.half() after get_peft_model), or train "
            "in bf16",
        ),
        Cause(
            "weights-already-nonfinite",
            "the module's weights were already non-finite (since the optimizer step of step "
            "{since}); the forward pass only shows it",
            "See the anomaly of step {since}: that optimizer step is the cause",
        ),
        Cause(
            "attention-overflow",
            "attention scores overflowed {dtype}: the largest q·k product (before the 1/sqrt(d) "
            "scale) was {score:.4g} (limit {limit:.4g}); the query/key outputs stayed finite, the softmax did not",
            "Run attention in fp32 or bf16 (--precision bf16), or lower --lr / clip harder so "
            "query/key weights stop growing; --on-anomaly clip clamps the scores' module",
        ),
        Cause(
            "activation-overflow",
            "an activation overflowed {dtype} (largest finite value before: {absmax:.4g}, limit "
            "{limit:.4g}) in a module whose inputs were finite",
            "Use bf16 instead of fp16 (same range as fp32), keep this module in fp32, or clamp "
            "its output (--on-anomaly clip)",
        ),
        Cause(
            "forward-math",
            "a module produced NaN/Inf from finite inputs in {dtype} (not an overflow of a "
            "16-bit type): an invalid operation such as log of a negative, 0/0 or a fully "
            "masked softmax row",
            "Look at the exact op in the replay; check masks (a row masked with -inf "
            "everywhere gives NaN) and inputs to log/sqrt/division",
        ),
        Cause(
            "masked-softmax-row",
            "a softmax ran over a row whose every entry was masked (-inf): {op} made NaN from "
            "{rows} fully masked row(s). A sample with no valid position (all padding, an "
            "empty mask) has nothing to attend to, and exp(-inf)/0 is NaN",
            "Build the mask so every row keeps at least one valid position (drop empty "
            "samples or keep one token), or fill with torch.finfo(dtype).min instead of "
            "-inf; F.scaled_dot_product_attention returns 0 for fully masked rows",
        ),
        Cause(
            "divergence-overflow",
            "a value overflowed {dtype} from finite inputs{op} after the trainable weights "
            "grew {growth:.3g}x since step {since}: training diverged, and the NaN that "
            "followed the Inf (inf*0, inf-inf) is its consequence, not invalid math",
            "Lower --lr, add warm-up and clip the gradient norm (--max-grad-norm); the "
            "earlier warnings name when the growth started",
        ),
        Cause(
            "float-overflow",
            "a value overflowed {dtype} from finite inputs{op}: the Inf came first, and the "
            "NaN after it (inf*0, inf-inf) is its consequence, not invalid math",
            "Find what makes values this large (unnormalised inputs, exp of large values, "
            "a missing scale); normalise or clamp before this module",
        ),
        Cause(
            "unprobed-origin",
            "the first non-finite value appeared outside the probed modules: {label} is the "
            "first probed module to show it, and its input was already non-finite",
            "Probe more modules to find the op (--probe, e.g. '.*'), or replay the step",
        ),
        Cause(
            "all-labels-masked",
            "every activation was finite but the loss was not: the batch has no label token "
            "(all -100), so the mean loss is 0/0",
            "Check truncation and label masking for this batch (answers truncated away); "
            "stabilizer's encoder refuses such samples, custom collators may not",
        ),
        Cause(
            "loss-overflow",
            "every probed activation was finite but the loss was not",
            "Compute the loss in fp32 (upcast the logits) and check the targets' range; "
            "if the loss is computed in an unprobed module, probe it (--probe '.*')",
        ),
        Cause(
            "layernorm-backward",
            "the LayerNorm backward produced NaN/Inf from a finite incoming gradient: its input "
            "was (nearly) constant across features (RMS {rms:.3g} vs |mean| {mean:.3g}), so "
            "1/sqrt(var + eps) blew up in {dtype}",
            "Do not start query_tokens at exactly zero (random init), keep the Q-Former in "
            "fp32 (BLIP-2 does by default) or use bf16",
        ),
        Cause(
            "backward-overflow",
            "a gradient went non-finite in backward while the forward pass was finite",
            "Use bf16 or fp16 with GradScaler (--precision), lower --lr, or clip harder",
        ),
        Cause(
            "grad-nonfinite",
            "a parameter's gradient is non-finite while every probed activation gradient was "
            "finite",
            "Probe more modules (--probe) to find where; use GradScaler with fp16",
        ),
        Cause(
            "other-rank",
            "rank {origin} went non-finite first ({origin_pass} pass{origin_module}); this "
            "rank only received it through DDP's gradient all-reduce",
            "Read rank {origin}'s diagnosis ({origin_store} in the run folder, or the report): "
            "its batch or its replica is where the value was born",
        ),
        Cause(
            "divergence",
            "training is diverging: {what}",
            "Lower --lr, add warm-up, or clip the gradient norm (--max-grad-norm)",
        ),
        Cause(
            "near-overflow",
            "{label} is near the {dtype} limit, or growing towards it: abs-max {absmax:.4g} of "
            "{limit:.4g}",
            "Switch to bf16 or keep this module in fp32 before it overflows",
        ),
    ]
}


@dataclass
class Anomaly:
    """One diagnosis: where (pass, step, module, op), why (cause), and what to do (fix)."""

    step: int
    pass_: str  # input | forward | loss | backward | optimizer
    cause: str
    summary: str
    fix: str
    module: str | None = None  # human label
    module_path: str | None = None  # raw module path
    module_index: int | None = None
    op: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    warning: bool = False  # early warning: nothing is non-finite yet

    def headline(self) -> str:
        where = f" in {self.module}" if self.module else ""
        op = f" (op {self.op})" if self.op else ""
        kind = "warning" if self.warning else anomaly_kind(self.cause)
        return f"{kind} at step {self.step}, {self.pass_} pass{where}{op}"

    def card(self) -> str:
        """The text a user reads: where, cause, evidence, fix."""
        lines = [self.headline()]
        if self.module_path:
            lines.append(f"  module: {self.module_path}")
        lines.append(f"  cause:  {self.summary}")
        for key, value in self.evidence.items():
            lines.append(f"  {key}: {_fmt(value)}")
        lines.append(f"  fix:    {self.fix}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "pass": self.pass_,
            "cause": self.cause,
            "summary": self.summary,
            "fix": self.fix,
            "module": self.module,
            "module_path": self.module_path,
            "op": self.op,
            "evidence": self.evidence,
            "warning": self.warning,
        }


# Causes found before anything is non-finite: warnings, which do not stop a run unless
# on_warning="raise" (the NaN/Inf that follows names the warning that predicted it).
# A NaN/Inf cause that is the later consequence of an earlier warning's cause: the
# preflight or the warning that named the root predicted it.
ROOT_CAUSE = {"fp16-adam-overflow": "fp16-adam-underflow"}

FINITE_CAUSES = ("update-too-large", "fp16-adam-underflow", "gradscaler-misuse")


def anomaly_kind(cause: str | None) -> str:
    """How a headline names a (non-warning) anomaly of this cause."""
    # GradScaler misuse is also the cause of NaN/Inf it leads to; the others are finite.
    return "unstable update" if cause in FINITE_CAUSES[:2] else "NaN/Inf"


def make_anomaly(step: int, pass_: str, cause: str, **values: Any) -> Anomaly:
    """Fill a catalogue entry's templates with ``values``."""
    entry = CAUSES[cause]
    fields = {k: v for k, v in values.items() if not k.startswith("_")}
    return Anomaly(
        step=step,
        pass_=pass_,
        cause=cause,
        summary=entry.title.format(**fields),
        fix=entry.fix.format(**fields),
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return ", ".join(_fmt(v) for v in value[:6]) + f", ... ({len(value)} in all)"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)
