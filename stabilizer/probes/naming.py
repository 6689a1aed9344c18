"""Names a person reads: ``Q-Former layer 3 cross-attention key (LoRA B)``.

Built once from ``named_modules()``; nothing is written onto the user's modules.

    >>> describe("base_model.model.qformer.encoder.layer.3.crossattention.attention.key.lora_B.default")
    ModuleName(label='Q-Former layer 3 cross-attention key (LoRA B)', kind='cross-attn', layer=3, component='qformer')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PEFT_PREFIXES = ("base_model.model.", "base_model.")
_LAYER = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(.*)$")
_PEFT_PART = {
    "lora_A": "LoRA A",
    "lora_B": "LoRA B",
    "base_layer": "base",
    "modules_to_save": "trained copy",
    "original_module": "frozen original",
}
_IN_LAYER = [
    (r"^attention\.attention\.(query|key|value)$", "self-attention {0}", "self-attn"),
    (r"^attention\.attention$", "self-attention scores", "self-attn"),
    (r"^attention\.output\.dense$", "self-attention output", "self-attn"),
    (r"^attention\.output\.LayerNorm$", "self-attention LayerNorm", "self-attn"),
    (r"^attention$", "self-attention block", "self-attn"),
    (r"^crossattention\.attention\.(query|key|value)$", "cross-attention {0}", "cross-attn"),
    (r"^crossattention\.attention$", "cross-attention scores", "cross-attn"),
    (r"^crossattention\.output\.dense$", "cross-attention output", "cross-attn"),
    (r"^crossattention\.output\.LayerNorm$", "cross-attention LayerNorm", "cross-attn"),
    (r"^crossattention$", "cross-attention block", "cross-attn"),
    (r"^intermediate_query\.dense$", "FFN (queries) up-projection", "ffn"),
    (r"^output_query\.dense$", "FFN (queries) down-projection", "ffn"),
    (r"^output_query\.LayerNorm$", "FFN (queries) LayerNorm", "ffn"),
    (r"^intermediate\.dense$", "FFN (text) up-projection", "ffn"),
    (r"^output\.dense$", "FFN (text) down-projection", "ffn"),
    (r"^output\.LayerNorm$", "FFN (text) LayerNorm", "ffn"),
]


@dataclass(frozen=True)
class ModuleName:
    label: str
    kind: str  # self-attn | cross-attn | ffn | projection | embeddings | component | lora | other
    layer: int | None
    component: str  # vision_model | qformer | language_projection | language_model | other


def strip_peft(name: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _split_peft(name: str) -> tuple[str, list[str]]:
    """``x.key.lora_B.default`` -> (``x.key``, [``LoRA B``])."""
    parts = name.split(".")
    tags: list[str] = []
    while parts:
        if parts[-1] == "default" and len(parts) > 1 and parts[-2] in _PEFT_PART:
            tags.insert(0, _PEFT_PART[parts[-2]])
            parts = parts[:-2]
        elif parts[-1] in _PEFT_PART:
            tags.insert(0, _PEFT_PART[parts[-1]])
            parts = parts[:-1]
        else:
            break
    return ".".join(parts), tags


def describe(raw_name: str) -> ModuleName:
    """A readable label, kind, layer and component for a (peft-wrapped) module path."""
    name, tags = _split_peft(strip_peft(raw_name))
    suffix = f" ({', '.join(tags)})" if tags else ""
    component = name.split(".", 1)[0] if name else "model"
    match = _LAYER.match(name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        for pattern, template, kind in _IN_LAYER:
            found = re.match(pattern, rest)
            if found:
                return ModuleName(
                    f"Q-Former layer {layer} {template.format(*found.groups())}{suffix}",
                    kind,
                    layer,
                    "qformer",
                )
        return ModuleName(f"Q-Former layer {layer} {rest}{suffix}", "other", layer, "qformer")
    if name == "language_projection":
        return ModuleName(f"language projection{suffix}", "projection", None, component)
    if name.startswith("qformer.") and "layernorm" in name.lower():
        return ModuleName(
            f"Q-Former {name.split('.', 1)[1]}{suffix}", "embeddings", None, "qformer"
        )
    if name in ("vision_model", "qformer", "language_model"):
        pretty = {"vision_model": "vision tower", "qformer": "Q-Former", "language_model": "LM"}
        return ModuleName(pretty[name] + suffix, "component", None, name)
    known = component in ("vision_model", "qformer", "language_model", "language_projection")
    return ModuleName((name or "model") + suffix, "other", None, component if known else "other")
