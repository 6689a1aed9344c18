"""LoRA on the Q-Former only: named target sets, injection with peft, and verification.

    >>> targets = resolve_targets(model, "attention")      # names of the Linear layers hit
    >>> peft_model = apply_lora(model, LoraSettings(targets="attention", rank=8))
    >>> verify_lora_scope(peft_model, allowed=allowed_components(settings))  # raises if not

Target sets (module names relative to the transformers model, layer ``L``):

| set         | modules                                                                       |
|-------------|-------------------------------------------------------------------------------|
| attention   | self- and cross-attention query/key/value and their output dense              |
| ffn         | FFN denses: ``intermediate(_query).dense``, ``output(_query).dense``           |
| all         | attention + ffn                                                               |
| paper       | Kim et al. 2024 (PEFT on Q-Former): self-attn query/value, cross-attn q/k/v/out,|
|             | both FFN denses                                                               |
| name-list   | ``["query","key","value","dense"]`` as many tutorials pass it to peft: every  |
|             | module of the whole model with such a suffix. For T5/OPT/LLaMA LMs that is    |
|             | the same as ``all``; with GPT-NeoX or Phi LMs it also hits LM attention, and  |
|             | training refuses to start.                                                    |

Anything else is a regular expression matched in full against module names.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from stabilizer.errors import ConfigError, LoraScopeError

_LAYER = r"^qformer\.encoder\.layer\.\d+\."
_SELF_QKV = _LAYER + r"attention\.attention\.(query|key|value)$"
_SELF_QV = _LAYER + r"attention\.attention\.(query|value)$"
_SELF_OUT = _LAYER + r"attention\.output\.dense$"
_CROSS = _LAYER + r"crossattention\.(attention\.(query|key|value)|output\.dense)$"
_FFN = _LAYER + r"(intermediate|output|intermediate_query|output_query)\.dense$"

TARGET_SETS: dict[str, tuple[str, ...]] = {
    "attention": (_SELF_QKV, _SELF_OUT, _CROSS),
    "ffn": (_FFN,),
    "all": (_SELF_QKV, _SELF_OUT, _CROSS, _FFN),
    "paper": (_SELF_QV, _CROSS, _FFN),
    # What peft does with target_modules=["query", "key", "value", "dense"]: suffix
    # matching over the whole model, so LMs with such names are hit too.
    "name-list": (r"^(.*\.)?(query|key|value|dense)$",),
}

# The parts of a BLIP-2/InstructBLIP model, in forward order, by name prefix.
COMPONENTS = ("vision_model", "query_tokens", "qformer", "language_projection", "language_model")


@dataclass(frozen=True)
class LoraSettings:
    """How LoRA is put on the Q-Former.

    Attributes:
        targets: a target set name (see module docstring) or a regular expression.
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / rank.
        dropout: dropout on the LoRA input (0 keeps steps deterministic).
        train_query_tokens: also train the learned query embeddings.
        train_projection: also train ``language_projection`` (Q-Former -> LM).
    """

    targets: str = field(default="all", metadata={"help": "Q-Former layers LoRA adapts"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the LoRA input (0 keeps steps deterministic)"}
    )
    train_query_tokens: bool = field(
        default=True, metadata={"help": "also train the learned query embeddings"}
    )
    train_projection: bool = field(
        default=True, metadata={"help": "also train language_projection (Q-Former -> LM)"}
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"--rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.targets not in TARGET_SETS:
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise ConfigError(
                    f"--lora-targets '{self.targets}' is neither a target set "
                    f"({', '.join(TARGET_SETS)}) nor a valid regular expression: {exc}"
                ) from exc


def _patterns(targets: str) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in TARGET_SETS.get(targets, (targets,))]
    except re.error as exc:
        raise ConfigError(
            f"--lora-targets '{targets}' is neither a target set "
            f"({', '.join(TARGET_SETS)}) nor a valid regular expression: {exc}"
        ) from exc


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``targets`` selects, in order."""
    patterns = _patterns(targets)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(p.fullmatch(name) for p in patterns)
    ]
    if not names:
        raise ConfigError(
            f"--lora-targets '{targets}' matches no Linear layer of this model. "
            "Run `stabilizer inspect --model ...` to see the module names"
        )
    return names


def allowed_components(settings: LoraSettings) -> tuple[str, ...]:
    allowed = ["qformer"]
    if settings.train_query_tokens:
        allowed.append("query_tokens")
    if settings.train_projection:
        allowed.append("language_projection")
    return tuple(allowed)


def strip_peft_prefix(name: str) -> str:
    """``base_model.model.qformer.x.lora_A.default.weight`` -> ``qformer.x.lora_A.default.weight``."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def component_of(name: str) -> str:
    """Which part of the model a (peft-prefixed or plain) parameter name belongs to."""
    plain = strip_peft_prefix(name)
    for component in COMPONENTS:
        if plain == component or plain.startswith(component + "."):
            return component
    return "other"


def apply_lora(model: nn.Module, settings: LoraSettings, *, adapter_dtype: torch.dtype | None):
    """Wrap ``model`` with peft LoRA adapters on the Q-Former targets.

    ``adapter_dtype=None`` keeps every trainable tensor in fp32 whatever the base
    dtype (peft's default upcast, extended to ``query_tokens`` and the projection).
    An explicit half dtype casts the adapters to it, which is how the classic
    fp16-under-AdamW failure is reproduced on purpose.
    """
    from peft import LoraConfig, get_peft_model

    target_names = resolve_targets(model, settings.targets)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # Exact names, not suffixes: "dense" alone would also hit some LMs' attention.
        target_modules=target_names,
        modules_to_save=["language_projection"] if settings.train_projection else None,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question; the answer is right, the noise is not ours.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    base.query_tokens.requires_grad_(settings.train_query_tokens)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.to(adapter_dtype or torch.float32)
    return peft_model


def lora_module_names(model: nn.Module) -> list[str]:
    """Names (without peft prefix) of the layers that carry a LoRA adapter."""
    return [
        strip_peft_prefix(name)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict)
    ]


def verify_lora_scope(model: nn.Module, allowed: tuple[str, ...]) -> None:
    """Refuse to train when a trainable tensor or a LoRA layer lies outside ``allowed``."""
    outside = [
        strip_peft_prefix(name)
        for name, param in model.named_parameters()
        if param.requires_grad and component_of(name) not in allowed
    ]
    outside += [name for name in lora_module_names(model) if component_of(name) != "qformer"]
    if outside:
        shown = ", ".join(outside[:5]) + (
            f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        )
        raise LoraScopeError(
            f"training refused: {len(outside)} trainable tensor(s) or LoRA layer(s) lie outside "
            f"the allowed components ({', '.join(allowed)}): {shown}. Narrow --lora-targets "
            "(see `stabilizer inspect`) or allow the component explicitly"
        )


@dataclass(frozen=True)
class ComponentCount:
    component: str
    total: int
    trainable: int
    tensors: int


def count_parameters(model: nn.Module) -> list[ComponentCount]:
    """Total and trainable parameter counts per component, in forward order.

    A ``ModulesToSaveWrapper`` keeps the frozen original beside the trainable
    copy; the original is not counted twice.
    """
    totals: OrderedDict[str, list[int]] = OrderedDict((c, [0, 0, 0]) for c in COMPONENTS)
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        row = totals.setdefault(component_of(name), [0, 0, 0])
        row[0] += param.numel()
        if param.requires_grad:
            row[1] += param.numel()
            row[2] += 1
    return [ComponentCount(c, *row) for c, row in totals.items() if row[0]]


def parameter_table(model: nn.Module, title: str = "Trainable parameters"):
    """A rich table of parameters by component, with counts and percentages."""
    from rich.table import Table

    counts = count_parameters(model)
    total = sum(c.total for c in counts)
    trainable = sum(c.trainable for c in counts)
    table = Table(title=title)
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("trainable tensors", justify="right")
    table.add_column("% of model", justify="right")
    for c in counts:
        table.add_row(
            c.component,
            f"{c.total:,}",
            f"{c.trainable:,}",
            str(c.tensors),
            f"{100 * c.trainable / total:.4f}%",
        )
    table.add_row(
        "total", f"{total:,}", f"{trainable:,}", "", f"{100 * trainable / total:.4f}%", style="bold"
    )
    return table
