"""``stabilizer inspect``: the Q-Former's layers, what each LoRA target set hits, the counts.

Layers repeat, so modules are shown once per pattern with the layer index as
``L`` and the list of layers that have it (cross-attention exists only every
``cross_attention_frequency`` layers).
"""

from __future__ import annotations

import re
from collections import OrderedDict

from rich.console import Console
from rich.table import Table
from rich.tree import Tree
from torch import nn

from stabilizer.models.lora import TARGET_SETS, resolve_targets
from stabilizer.models.presets import PRESETS

_LAYER_RE = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.")


def _build(model_name: str) -> nn.Module:
    if model_name in PRESETS:
        from stabilizer.models.presets import build_preset

        model, _ = build_preset(model_name, device="meta")
        return model
    from stabilizer.models.loading import load_model

    return load_model(model_name).model


def _pattern(name: str) -> tuple[str, int | None]:
    match = _LAYER_RE.match(name)
    if not match:
        return name, None
    return _LAYER_RE.sub("qformer.encoder.layer.L.", name), int(match.group(1))


def _layer_ranges(layers: list[int]) -> str:
    if not layers:
        return "-"
    runs, start, prev = [], layers[0], layers[0]
    for layer in layers[1:] + [None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    step = layers[1] - layers[0] if len(layers) > 1 else 0
    if step > 1 and all(b - a == step for a, b in zip(layers, layers[1:], strict=False)):
        return f"{layers[0]}-{layers[-1]}, every {step}"
    return ", ".join(runs)


def module_rows(model: nn.Module) -> OrderedDict[str, dict]:
    """Linear layers of the Q-Former and the projection, grouped by pattern."""
    rows: OrderedDict[str, dict] = OrderedDict()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not name.startswith("qformer."):
            continue
        pattern, layer = _pattern(name)
        row = rows.setdefault(
            pattern,
            {"layers": [], "shape": (module.in_features, module.out_features), "names": []},
        )
        row["names"].append(name)
        if layer is not None:
            row["layers"].append(layer)
    return rows


def inspect_model(
    model_name: str, *, rank: int = 8, extra_targets: str | None = None, console: Console
) -> dict[str, dict]:
    """Print the report; returns ``{target_set: {"modules": n, "lora_params": n}}``."""
    model = _build(model_name)
    total = sum(p.numel() for p in model.parameters())
    qformer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("qformer."))
    cfg = model.config.qformer_config
    console.print(
        f"[bold]{model_name}[/]: {total:,} parameters; Q-Former {qformer:,} "
        f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"cross-attention every {cfg.cross_attention_frequency} layer(s)); "
        f"{model.config.num_query_tokens} query tokens"
    )
    console.print(_tree(model))

    sets = dict(TARGET_SETS)
    if extra_targets and extra_targets not in sets:
        sets[extra_targets] = (extra_targets,)
    hits = {}
    for set_name in sets:
        try:
            hits[set_name] = set(resolve_targets(model, set_name))
        except Exception:
            hits[set_name] = set()

    rows = module_rows(model)
    table = Table(
        title="Linear layers of the Q-Former, by LoRA target set",
        caption="modules under qformer.encoder.layer.L; ✓ = hit in every layer listed",
    )
    table.add_column("module")
    table.add_column("layers")
    table.add_column("in x out", justify="right")
    for set_name in sets:
        table.add_column(set_name, justify="center")
    for pattern, row in rows.items():
        marks = []
        for set_name in sets:
            hit = sum(n in hits[set_name] for n in row["names"])
            marks.append("✓" if hit == len(row["names"]) else (f"{hit}" if hit else ""))
        layers = _layer_ranges(sorted(row["layers"]))
        shown = pattern.removeprefix("qformer.encoder.layer.L.")
        table.add_row(shown, layers, f"{row['shape'][0]}x{row['shape'][1]}", *marks)
    console.print(table)

    summary = Table(title=f"What each target set trains at rank {rank}")
    summary.add_column("target set")
    summary.add_column("modules", justify="right")
    summary.add_column("LoRA parameters", justify="right")
    summary.add_column("% of model", justify="right")
    summary.add_column("outside the Q-Former", justify="right")
    counts: dict[str, dict] = {}
    linear = dict(model.named_modules())
    for set_name, names in hits.items():
        params = sum(rank * (linear[n].in_features + linear[n].out_features) for n in names)
        outside = sum(not n.startswith("qformer.") for n in names)
        counts[set_name] = {"modules": len(names), "lora_params": params, "outside": outside}
        summary.add_row(
            set_name,
            str(len(names)),
            f"{params:,}",
            f"{100 * params / total:.4f}%",
            f"[red]{outside}[/]" if outside else "0",
        )
    console.print(summary)
    console.print(
        "Train with e.g. `stabilizer train --lora-targets attention --rank 8`. "
        "query_tokens and language_projection are trained too unless "
        "--freeze-query-tokens / --freeze-projection."
    )
    return counts


def _tree(model: nn.Module) -> Tree:
    """Layer 0 of the Q-Former in full (the other layers repeat it), plus what surrounds it."""
    tree = Tree("qformer")
    q = model.qformer
    for name, child in q.named_children():
        if name != "encoder":
            tree.add(f"{name}: {type(child).__name__}")
    encoder = tree.add("encoder.layer[L]: repeats for every layer; layer 0 shown")
    _add_children(encoder, q.encoder.layer[0], depth=0)
    return tree


def _add_children(node: Tree, module: nn.Module, depth: int) -> None:
    for name, child in module.named_children():
        label = f"{name}: {type(child).__name__}"
        if isinstance(child, nn.Linear):
            label += f" ({child.in_features} -> {child.out_features})"
        sub = node.add(label)
        if depth < 4:
            _add_children(sub, child, depth + 1)
