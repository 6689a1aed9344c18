"""Preflight: the failures a configuration will hit, named before step 0.

Everything here reads the model, the optimizer, the scaler and the first
batches; nothing runs a forward or changes a tensor. Each finding names what
was found, the fix, and (where the detector has one) the cause id the detector
would give the same failure after the fact, so the preflight row and the
diagnosis card say the same thing.

    >>> report = preflight(model, optimizer, scaler=None, batches=[batch])
    >>> console.print(report.table())
    >>> report.raise_for_errors()        # PreflightError when a row is an error

Used by ``stabilizer check``, at the start of ``stabilizer train`` and of
``stabilizer.watch``. probes/ and detector/ do not import it; it imports the
detector's cause catalogue only for the shared fix text.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from stabilizer.detector.diagnosis import CAUSES
from stabilizer.errors import StabilizerError
from stabilizer.models.lora import COMPONENTS, component_of, lora_module_names, strip_peft_prefix

# fp16's smallest subnormal: an eps below it is 0 (or one subnormal) in fp16 math.
FP16_TINIEST = 2.0**-24
# bf16 keeps 8 significant bits: an update below half an ulp of the weight rounds away.
BF16_HALF_ULP = 2.0**-9
LEVELS = ("error", "warning", "ok")


class PreflightError(StabilizerError):
    """Preflight found a configuration that fails; the message lists each error and fix."""

    def __init__(self, report: PreflightReport, errors: list[Finding] | None = None) -> None:
        self.report = report
        errors = report.errors if errors is None else errors
        lines = [f"preflight: {len(errors)} error(s) before step 0"]
        for f in errors:
            lines.append(f"- {f.check}: {f.message}. Fix: {f.fix}")
        lines.append("To train anyway: --preflight warn (stabilizer.watch(..., preflight='warn'))")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning | ok
    check: str  # dtypes, optimizer, scaler, lora, checkpointing, batch, quantization
    message: str
    fix: str = ""
    cause: str | None = None  # the detector's cause id for the same failure, if any

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"Finding.level must be one of {LEVELS}, got {self.level!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PreflightReport:
    findings: list[Finding] = field(default_factory=list)
    dtype_map: OrderedDict[str, str] = field(default_factory=OrderedDict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def causes(self) -> list[str]:
        return [f.cause for f in self.findings if f.cause and f.level != "ok"]

    def raise_for_errors(self) -> None:
        if self.errors:
            raise PreflightError(self)

    def to_dict(self) -> dict:
        return {
            "dtypes": dict(self.dtype_map),
            "findings": [f.to_dict() for f in self.findings],
        }

    def table(self, title: str = "Preflight (before step 0)"):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=title, show_lines=False)
        table.add_column("", no_wrap=True)
        table.add_column("check", no_wrap=True)
        table.add_column("finding")
        table.add_column("fix")
        marks = {"error": "[bold red]error[/]", "warning": "[yellow]warn[/]", "ok": "[green]ok[/]"}
        dtypes = "; ".join(f"{k} {v}" for k, v in self.dtype_map.items())
        table.add_row("", "dtypes", escape(dtypes), "")
        for f in sorted(self.findings, key=lambda f: LEVELS.index(f.level)):
            table.add_row(marks[f.level], f.check, escape(f.message), escape(f.fix))
        return table


def preflight(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    batches: Iterable[Mapping[str, object]] = (),
    allowed: tuple[str, ...] | None = None,
) -> PreflightReport:
    """Every check below, in one report (see the module doc).

    ``allowed``: the components that may train (``stabilizer train``: the Q-Former and
    its LoRA scope, an error outside it). None (your own loop): LoRA outside the
    Q-Former is a warning, since you may mean it.
    """
    trainable = _trainable(model, optimizer)
    report = PreflightReport(dtype_map=dtype_map(model, optimizer))
    checks = [
        functools.partial(check_optimizer, trainable, optimizer),
        functools.partial(check_scaler, trainable, scaler),
        functools.partial(check_qformer_dtype, model),
        functools.partial(check_lora, model, allowed),
        functools.partial(check_checkpointing, model),
        functools.partial(check_quantization, model),
        functools.partial(check_batches, list(batches)),
    ]
    for check in checks:
        report.findings.extend(check())
    return report


# -- the dtype map ---------------------------------------------------------------------------


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


def _parts(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(component, name, parameter) with BLIP components where they exist, else the
    top-level child (any model watch() is given)."""
    blip = any(component_of(n) != "other" for n, _ in model.named_parameters())
    rows = []
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue  # peft's frozen original beside a trainable copy
        top = name.split(".")[0] if "." in name else "(root)"
        rows.append((component_of(name) if blip else top, name, param))
    return rows


def dtype_map(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> OrderedDict:
    """component -> "fp16 frozen + fp32 trainable" (and "optimizer state" when it exists)."""
    found: OrderedDict[str, dict[str, set]] = OrderedDict()
    order = {c: i for i, c in enumerate(COMPONENTS)}
    for part, _, param in _parts(model):
        kinds = found.setdefault(part, {"frozen": set(), "trainable": set()})
        kinds["trainable" if param.requires_grad else "frozen"].add(_short(param.dtype))
    out: OrderedDict[str, str] = OrderedDict()
    for part in sorted(found, key=lambda p: order.get(p, len(order))):
        kinds = found[part]
        out[part] = " + ".join(f"{'/'.join(sorted(d))} {kind}" for kind, d in kinds.items() if d)
    if optimizer is not None:
        states = {
            _short(t.dtype)
            for state in optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0
        }
        out["optimizer state"] = "/".join(sorted(states)) if states else "none yet (before step 0)"
    return out


def _trainable(model: nn.Module, optimizer) -> list[tuple[str, nn.Parameter]]:
    named = {id(p): n for n, p in model.named_parameters()}
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        return [(named.get(id(p), "(unnamed)"), p) for p in params]
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -- optimizer and precision ---------------------------------------------------------------


def _is_adam(optimizer) -> bool:
    # Adam, AdamW and friends (and bitsandbytes' / apex's copies): betas and eps.
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    return "betas" in group and "eps" in group


def _has_master_copy(optimizer) -> bool:
    # Mixed-precision optimizers that keep fp32 masters (apex's FP16_Optimizer and
    # similar) expose them; torch's own optimizers never do.
    return any(hasattr(optimizer, a) for a in ("fp32_from_fp16_groups", "master_params"))


def _peak_lr(group: Mapping) -> float:
    # A LambdaLR warm-up sets lr to 0 at step 0; initial_lr is what it ramps to.
    return float(group.get("initial_lr", group.get("lr", 0.0)))


def check_optimizer(trainable, optimizer) -> list[Finding]:
    if optimizer is None:
        return []
    fp16 = [strip_peft_prefix(n) for n, p in trainable if p.dtype == torch.float16]
    fp16.sort(key=lambda n: "lora_A" not in n)  # name the tensor that makes the 0/0
    findings: list[Finding] = []
    if fp16 and not _has_master_copy(optimizer):
        eps = min(float(g.get("eps", 1.0)) for g in optimizer.param_groups)
        if _is_adam(optimizer) and eps < FP16_TINIEST:
            findings.append(
                Finding(
                    "error",
                    "optimizer",
                    f"{len(fp16)} trainable tensor(s) are fp16 under "
                    f"{type(optimizer).__name__} with eps={eps:g}, below fp16's smallest "
                    "value (6e-8): eps is 0 in the update, lora_A's first gradient is "
                    "exactly 0 (lora_B starts at 0), so step 0 computes 0/0 = NaN "
                    f"(e.g. {fp16[0]})",
                    CAUSES["fp16-adam-eps"].fix,
                    "fp16-adam-eps",
                )
            )
        elif _is_adam(optimizer):
            findings.append(
                Finding(
                    "warning",
                    "optimizer",
                    f"{len(fp16)} trainable tensor(s) and their Adam state are fp16 with no "
                    f"fp32 master copy: squared gradients below 6e-8 flush to 0 and the "
                    f"update becomes momentum/eps (eps={eps:g}); expect huge updates, then "
                    "NaN, within a few hundred steps",
                    CAUSES["fp16-adam-underflow"].fix,
                    "fp16-adam-underflow",
                )
            )
        else:
            findings.append(
                Finding(
                    "warning",
                    "optimizer",
                    f"{len(fp16)} trainable tensor(s) are fp16 with no fp32 master copy: "
                    "updates smaller than half an fp16 ulp of the weight are lost",
                    "Keep trainable tensors in fp32 and let autocast run the compute in fp16",
                )
            )
    findings.extend(_bf16_resolution(trainable, optimizer))
    if not findings:
        names = type(optimizer).__name__
        findings.append(Finding("ok", "optimizer", f"{names}: trainable tensors' dtypes fit it"))
    return findings


def _bf16_resolution(trainable, optimizer) -> list[Finding]:
    bf16 = [p for _, p in trainable if p.dtype == torch.bfloat16 and p.numel()]
    if not bf16 or not _is_adam(optimizer):
        return []
    lr = min(_peak_lr(g) for g in optimizer.param_groups)
    # Adam's update is about lr per element; it survives rounding when it is above
    # half an ulp of the weight. Tensors still all zero (lora_B at init) take any update.
    with torch.no_grad():
        rms = [
            float(p.detach().float().pow(2).mean().sqrt()) for p in bf16
        ]  # one-off, before step 0: syncs are fine here
    nonzero = [(p, r) for p, r in zip(bf16, rms, strict=True) if r > 0]
    lost = [(p, r) for p, r in nonzero if lr < r * BF16_HALF_ULP]
    if not nonzero or sum(p.numel() for p, _ in lost) * 2 < sum(p.numel() for p, _ in nonzero):
        return []
    typical = sorted(r for _, r in nonzero)[len(nonzero) // 2]
    return [
        Finding(
            "warning",
            "optimizer",
            f"bf16 trainable tensors: lr {lr:g} is below half a bf16 ulp of typical weights "
            f"(rms {typical:.3g} -> {typical * BF16_HALF_ULP:.2g}) for {len(lost)} of "
            f"{len(nonzero)} tensors: their updates round away and training does not train",
            "Keep trainable tensors in fp32 (autocast still computes in bf16), or raise --lr",
            "bf16-update-lost",
        )
    ]


def check_scaler(trainable, scaler) -> list[Finding]:
    if scaler is None or not scaler.is_enabled():
        return []
    fp16 = [n for n, p in trainable if p.dtype == torch.float16]
    if not fp16:
        return [Finding("ok", "scaler", "GradScaler with fp32 trainable tensors")]
    return [
        Finding(
            "error",
            "scaler",
            f"a GradScaler with {len(fp16)} fp16 trainable tensor(s): scaler.unscale_ / "
            "scaler.step raise 'Attempting to unscale FP16 gradients' (e.g. "
            f"{fp16[0]})",
            "Keep the trainable tensors in fp32 and run the forward under torch.autocast "
            "(fp16); the scaler then unscales fp32 gradients",
            "gradscaler-fp16-grads",
        )
    ]


def check_qformer_dtype(model: nn.Module) -> list[Finding]:
    dtypes = {p.dtype for n, p in model.named_parameters() if component_of(n) == "qformer"}
    if torch.float16 not in dtypes:
        return []
    return [
        Finding(
            "warning",
            "dtypes",
            "the Q-Former's weights are fp16: reference implementations keep it in fp32 "
            "(its attention scores and LayerNorms overflow fp16 first)",
            "Load in bf16 (--precision bf16), or keep the Q-Former in fp32 "
            "(model.qformer.float()) while the LM stays fp16",
            "activation-overflow",
        )
    ]


# -- LoRA scope, checkpointing, quantization -------------------------------------------------


def check_lora(model: nn.Module, allowed: tuple[str, ...] | None) -> list[Finding]:
    scope = "error" if allowed is not None else "warning"
    allowed = allowed or ("qformer", "query_tokens", "language_projection")
    names = [n for n, _ in model.named_parameters()]
    if not any(component_of(n) == "qformer" for n in names):
        return []  # not a BLIP-family model: nothing to say about its Q-Former
    findings: list[Finding] = []
    adapted = lora_module_names(model)
    is_peft = hasattr(model, "peft_config")
    if is_peft and not adapted:
        findings.append(
            Finding(
                "error",
                "lora",
                "the LoRA targets hit no layer: the model is wrapped by peft but carries no "
                "adapter",
                "Name real Linear layers in --lora-targets (stabilizer inspect lists them)",
            )
        )
    in_lm = [n for n in adapted if component_of(n) != "qformer"]
    if in_lm:
        findings.append(
            Finding(
                scope,
                "lora",
                f"{len(in_lm)} LoRA layer(s) outside the Q-Former, e.g. {in_lm[0]}",
                "Narrow --lora-targets to the Q-Former (see stabilizer inspect)",
            )
        )
    outside = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and component_of(n) not in allowed and ".original_module." not in n
    ]
    if outside:
        findings.append(
            Finding(
                scope,
                "lora",
                f"{len(outside)} trainable tensor(s) outside {', '.join(allowed)}, e.g. "
                f"{outside[0]}",
                "Freeze them, or allow the component explicitly",
            )
        )
    if not any(
        p.requires_grad and component_of(n) == "qformer" for n, p in model.named_parameters()
    ):
        findings.append(
            Finding(
                scope,
                "lora",
                "the Q-Former is frozen: no trainable tensor in it",
                "Put LoRA on the Q-Former (--lora-targets all) or unfreeze its adapters",
            )
        )
    if not findings:
        findings.append(Finding("ok", "lora", f"{len(adapted)} LoRA layer(s), all in the Q-Former"))
    return findings


def check_checkpointing(model: nn.Module) -> list[Finding]:
    hooked = any(hasattr(m, "_require_grads_hook") for m in model.modules())
    starved = []
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        reentrant = getattr(func, "keywords", {}).get("use_reentrant", True)
        trains = any(p.requires_grad for p in module.parameters())
        if reentrant and trains and not hooked:
            starved.append(name or "(root)")
    if not starved:
        return []
    return [
        Finding(
            "error",
            "checkpointing",
            f"reentrant gradient checkpointing in {starved[0]} with no input that requires "
            "grad: the checkpointed blocks' adapters get no gradient at all",
            "Call model.enable_input_require_grads() (peft's prepare_model_for_kbit_training "
            "does), or checkpoint with use_reentrant=False",
        )
    ]


def check_quantization(model: nn.Module) -> list[Finding]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = any(
        getattr(base, a, False) for a in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized")
    )
    if not quantized:
        return []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return [
            Finding(
                "ok",
                "quantization",
                "quantized base model; bitsandbytes is not installed here, its compute "
                "dtype was not checked",
            )
        ]
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    compute = getattr(config, "bnb_4bit_compute_dtype", None)
    if compute == torch.float16:
        return [
            Finding(
                "warning",
                "quantization",
                "4-bit base model computing in fp16: its activations overflow where bf16's "
                "range would not",
                "Set bnb_4bit_compute_dtype=torch.bfloat16 in BitsAndBytesConfig",
                "activation-overflow",
            )
        ]
    return [Finding("ok", "quantization", f"quantized base model, compute dtype {compute}")]


# -- the first batches -----------------------------------------------------------------------


def check_batches(batches: list[Mapping[str, object]]) -> list[Finding]:
    if not batches:
        return []
    findings: list[Finding] = []
    for index, batch in enumerate(batches):
        where = f"batch {index}"
        for key, value in batch.items():
            floating = isinstance(value, torch.Tensor) and value.is_floating_point()
            if floating and not bool(torch.isfinite(value).all()):
                findings.append(
                    Finding(
                        "error",
                        "batch",
                        f"{where}: {key} holds NaN/Inf before any module runs",
                        CAUSES["nonfinite-input"].fix,
                        "nonfinite-input",
                    )
                )
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.numel():
            rows = labels.reshape(labels.shape[0], -1) if labels.dim() else labels.reshape(1, -1)
            empty = int((rows == -100).all(dim=1).sum())
            if empty == rows.shape[0]:
                findings.append(
                    Finding(
                        "error",
                        "batch",
                        f"{where}: every label is -100 (masked): the mean loss is 0/0 = NaN",
                        CAUSES["all-labels-masked"].fix,
                        "all-labels-masked",
                    )
                )
            elif empty:
                findings.append(
                    Finding(
                        "warning",
                        "batch",
                        f"{where}: {empty} of {rows.shape[0]} samples have no answer token "
                        "left (labels all -100: truncated away); they teach nothing",
                        "Raise --max-prompt-tokens/--max-answer-tokens or shorten prompts",
                        "all-labels-masked",
                    )
                )
        for key in ("attention_mask", "qformer_attention_mask", "decoder_attention_mask"):
            mask = batch.get(key)
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.numel():
                dead = int((mask.reshape(mask.shape[0], -1) == 0).all(dim=1).sum())
                if dead:
                    findings.append(
                        Finding(
                            "warning",
                            "batch",
                            f"{where}: {key} masks every position of {dead} row(s): a "
                            "softmax over nothing gives NaN (or, with finite fills, noise)",
                            CAUSES["masked-softmax-row"].fix.split(";")[0],
                            "masked-softmax-row",
                        )
                    )
    if not findings:
        n = len(batches)
        findings.append(
            Finding("ok", "batch", f"first {n} batch(es): finite, labelled, unmasked rows")
        )
    return findings


def gate(
    report: PreflightReport,
    *,
    mode: str,
    console,
    tolerated: tuple[str, ...] = (),
    title: str = "Preflight (before step 0)",
) -> None:
    """Print the report as one table; with ``mode="stop"`` raise on an error whose
    cause is not in ``tolerated`` (a failure reproduced on purpose)."""
    if mode == "off":
        return
    console.print(report.table(title=title))
    blocking = [f for f in report.errors if f.cause not in tolerated]
    if blocking and mode == "stop":
        raise PreflightError(report, blocking)
