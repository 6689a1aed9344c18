"""The report's PNGs, drawn from the trace store alone (matplotlib, no pyplot, no torch).

    >>> with TraceStore.open(run_dir / "trace.db") as store:
    ...     figures = make_figures(store, run_dir / "report")
    >>> [f.name for f in figures]
    ['training-curves', 'heatmap-fwd_out-absmax', 'heatmap-fwd_out-rms',
     'heatmap-grad_out-rms', 'layer-norms', 'lora-update-ratio']

| figure                 | shows                                                            |
|------------------------|------------------------------------------------------------------|
| training-curves        | loss, learning rate, grad norm; skipped/rolled-back/stopped steps |
| heatmap-<site>-<stat>  | modules x traced steps, log10 colour, NaN/Inf cells in magenta    |
| layer-norms            | per Q-Former layer max output abs-max vs the fp16 limit; scores   |
| lora-update-ratio      | ||dW|| / ||W|| per LoRA adapter (lines, or a heatmap when many)    |

A figure whose data the store lacks (no full steps, no LoRA adapters...) is left out.
Figures are drawn on ``matplotlib.figure.Figure`` objects directly: no pyplot, no global
backend switch, so this is safe inside a notebook or a training process.

Helpers the HTML page can reuse: ``module_order``, ``group_label``, ``short_label``,
``hard_anomalies``, ``first_offender`` and ``TraceView`` (cached reads of one store).
"""

from __future__ import annotations

import contextlib
import math
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from stabilizer.probes.schema import SITES, TENSOR_STATS
from stabilizer.reports import Figure
from stabilizer.store import ModuleInfo, ParamInfo, TraceStore

DPI = 110
MAX_COLUMNS = 600  # heatmap columns at most; longer runs keep the max of each bucket of steps
LABEL_EVERY_ROW = 60  # up to this many rows every row is labelled, beyond only the groups
FP16_MAX = 65504.0
MAX_DECADES = 12.0  # heatmap colour range at most; lower values take the lowest colour
HALF_PRECISION = ("fp16", "bf16")
# Display order of module kinds inside one layer; unknown kinds sort just before "other".
KIND_ORDER = ("embeddings", "self-attn", "cross-attn", "ffn", "projection", "lora", "component")
KIND_SHORT = {
    "self-attn": "self-attn",
    "cross-attn": "cross-attn",
    "ffn": "FFN",
    "projection": "projection",
    "embeddings": "embeddings",
    "component": "components",
    "lora": "LoRA",
    "other": "other",
}
STATUS_STYLE = {  # steps()["status"] -> (colour, legend text); "ok" is not marked
    "skipped": ("#f4a261", "skipped (update undone)"),
    "rolled_back": ("#9b5de5", "rolled back"),
    "anomaly": ("#e63946", "anomaly (update kept)"),
    "stopped": ("#555555", "stopped"),
}
NONFINITE_COLOUR = "#ff00ff"
MISSING_COLOUR = "#d9d9d9"
ZERO_COLOUR = "#ffffff"
ANOMALY_COLOUR = "#d62828"
TYPICAL_UPDATE = (1e-3, 1e-2)

_SITE_WORDS = {
    "fwd_in": "input",
    "fwd_out": "output",
    "grad_out": "gradient w.r.t. the output",
    "grad_in": "gradient w.r.t. the input",
}
_STAT_WORDS = {"absmax": "abs-max", "rms": "RMS", "mean": "mean"}


# ---------------------------------------------------------------------- module helpers


def _section(module: ModuleInfo) -> int:
    """Where a module sits top to bottom: embeddings, the layers, projection, the rest."""
    if module.layer is not None:
        return 1
    if module.kind == "embeddings":
        return 0
    if module.kind == "projection":
        return 2
    return 3


def _kind_rank(kind: str) -> int:
    if kind in KIND_ORDER:
        return KIND_ORDER.index(kind)
    return len(KIND_ORDER) + (1 if kind == "other" else 0)


def module_order(modules: Sequence[ModuleInfo]) -> list[int]:
    """Module ids in display order: by layer, then kind, then the model's own order.

    Q-Former embeddings come first, then layer 0, 1, ... (inside a layer: self-attn,
    cross-attn, FFN, projection, other), then the language projection, then whole
    components (vision tower, Q-Former, LM) and anything else. Inside one (layer, kind)
    group modules keep their id order, which is the order ``named_modules()`` lists them
    (query, key, value, output, LayerNorm), so a LoRA A/B pair stays under its layer.

    Example::

        rows = module_order(store.modules())      # rows[0] is the module drawn on top
        values[:, rows]                           # reorder a (steps, modules) array
    """
    ranked = sorted(
        modules,
        key=lambda m: (
            _section(m),
            m.layer if m.layer is not None else -1,
            _kind_rank(m.kind),
            m.id,
        ),
    )
    return [m.id for m in ranked]


def group_label(module: ModuleInfo) -> str:
    """The group a module belongs to in plots and tables: ``"L3 cross-attn"``, ``"L0 FFN"``.

    Modules outside the layers get ``"embeddings"``, ``"projection"``, ``"components"``
    or ``"other"``.

    Example::

        group_label(ModuleInfo(3, "...layer.3.crossattention.attention.key", "...",
                               "cross-attn", 3, "qformer", False))   # "L3 cross-attn"
    """
    kind = KIND_SHORT.get(module.kind, module.kind)
    if module.layer is not None:
        return f"L{module.layer} {kind}"
    return kind


def short_label(label: str) -> str:
    """A compact row label: ``"Q-Former layer 3 cross-attention key (LoRA B) .weight"``
    becomes ``"L3 cross-attention key (LoRA B)"``."""
    label = re.sub(r"^Q-Former layer (\d+) ", r"L\1 ", label)
    return re.sub(r" \.weight$", "", label)


def hard_anomalies(anomalies: Sequence[dict]) -> list[dict]:
    """The anomalies that are not early warnings (``evidence["warning"]`` falsy)."""
    return [a for a in anomalies if not (a.get("evidence") or {}).get("warning")]


def first_offender(anomalies: Sequence[dict]) -> dict | None:
    """The first recorded non-warning anomaly that names a module, or None."""
    for anomaly in hard_anomalies(anomalies):
        if anomaly.get("module_id") is not None:
            return anomaly
    return None


def row_groups(labels: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of equal consecutive labels as ``(label, first_row, stop_row)``."""
    groups: list[tuple[str, int, int]] = []
    for row, label in enumerate(labels):
        if groups and groups[-1][0] == label:
            groups[-1] = (label, groups[-1][1], row + 1)
        else:
            groups.append((label, row, row + 1))
    return groups


def bucket_starts(n_steps: int, max_columns: int = MAX_COLUMNS) -> np.ndarray:
    """First row of each bucket when ``n_steps`` rows are squeezed into ``max_columns``."""
    per = max(1, math.ceil(n_steps / max(1, max_columns)))
    return np.arange(0, n_steps, per, dtype=np.int64)


def step_columns(col_first: np.ndarray, col_last: np.ndarray, steps: Sequence[int]) -> np.ndarray:
    """Heatmap x positions of ``steps`` (anomaly steps) for columns ``col_first..col_last``.

    A step inside a column's range gets that column's index; a step between two columns
    (not traced in full) the border between them, -0.5 before the first and
    ``n - 0.5`` after the last.
    """
    steps = np.asarray(steps, dtype=np.int64)
    n = len(col_first)
    if n == 0 or steps.size == 0:
        return np.zeros(0)
    col = np.searchsorted(col_first, steps, side="right") - 1
    inside = (col >= 0) & (steps <= col_last[np.clip(col, 0, n - 1)])
    x = np.where(col < 0, -0.5, np.where(inside, col, col + 0.5)).astype(float)
    return np.minimum(x, n - 0.5)


# ---------------------------------------------------------------------- cached reads


class TraceView:
    """Cached reads of one trace store: each (stat, site) is fetched once per report.

    Arrays are read on first use, so keep the store open while the view is in use.

    Example::

        view = TraceView(store)
        steps, absmax = view.module_stat("absmax", "fwd_out")
        steps, bad = view.nonfinite("fwd_out")      # bool (S, n_modules), full steps
    """

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self.modules: list[ModuleInfo] = store.modules()
        self.params: list[ParamInfo] = store.params()
        self.meta: dict = store.meta()
        config = self.meta.get("config")
        self.config: dict = config if isinstance(config, dict) else {}
        self.steps: dict[str, np.ndarray] = store.steps()
        self.anomalies: list[dict] = store.anomalies()
        self.hard_anomalies = hard_anomalies(self.anomalies)
        self.order = np.array(module_order(self.modules), dtype=np.int64)
        self._module: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._nonfinite: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._param: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def full_steps(self) -> np.ndarray:
        return self.steps["step"][self.steps["full"]]

    def module_stat(self, stat: str, site: str) -> tuple[np.ndarray, np.ndarray]:
        """``store.module_stat(stat, site)`` (full steps), cached."""
        key = (stat, site)
        if key not in self._module:
            self._module[key] = self.store.module_stat(stat, site)
        return self._module[key]

    def param_stat(self, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """``store.param_stat(stat)``, cached."""
        if stat not in self._param:
            self._param[stat] = self.store.param_stat(stat)
        return self._param[stat]

    def prefetch(self, site: str, stats: Sequence[str]) -> None:
        """Read several stats of ``site`` in one pass over the table instead of one per stat.

        Fills the caches of ``module_stat`` (and of ``nonfinite`` when ``nan`` and ``inf``
        are among ``stats``) with exactly what the store's readers would return. On any
        SQL error it does nothing and the store's readers are used later.
        """
        wanted = [s for s in TENSOR_STATS if s in stats and (s, site) not in self._module]
        if not wanted or site not in SITES:
            return
        try:
            with self._sql() as conn:
                rows = conn.execute(
                    # column names come from TENSOR_STATS, never from the caller verbatim
                    f"SELECT step, module_id, {', '.join(wanted)} FROM module_stats WHERE site = ?",
                    (site,),
                ).fetchall()
        except sqlite3.Error:
            return
        steps, n = self.full_steps, len(self.modules)
        arr = np.array(rows, dtype=float).reshape(-1, 2 + len(wanted))  # NULL -> NaN
        idx = np.searchsorted(steps, arr[:, 0].astype(np.int64))
        ok = (idx < len(steps)) & (arr[:, 1] >= 0) & (arr[:, 1] < n)
        ok[ok] = steps[idx[ok]] == arr[ok, 0]
        cells = (idx[ok], arr[ok, 1].astype(np.int64))
        for k, stat in enumerate(wanted):
            out = np.full((len(steps), n), np.nan)
            out[cells] = arr[ok, 2 + k]
            self._module[(stat, site)] = (steps, out)
        if site not in self._nonfinite and {"nan", "inf"} <= set(wanted):
            nan, inf = self._module[("nan", site)][1], self._module[("inf", site)][1]
            self._nonfinite[site] = (steps, (nan > 0) | (inf > 0))

    def nonfinite(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        """Full steps and a bool ``(S, n_modules)``: the site held NaN or Inf elements."""
        if site not in self._nonfinite:
            steps = self.full_steps
            mask = np.zeros((len(steps), len(self.modules)), dtype=bool)
            rows = self._nonfinite_rows(site)
            if rows is None:  # no plain-SQL access: two full reads through the store
                _, nan = self.module_stat("nan", site)
                _, inf = self.module_stat("inf", site)
                mask = (nan > 0) | (inf > 0)
            elif rows and len(steps):
                arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
                idx = np.searchsorted(steps, arr[:, 0])
                ok = (idx < len(steps)) & (arr[:, 1] >= 0) & (arr[:, 1] < len(self.modules))
                ok[ok] = steps[idx[ok]] == arr[ok, 0]
                mask[idx[ok], arr[ok, 1]] = True
            self._nonfinite[site] = (steps, mask)
        return self._nonfinite[site]

    def _nonfinite_rows(self, site: str) -> list[tuple[int, int]] | None:
        """(step, module_id) pairs with NaN/Inf at ``site``, read sparsely with plain SQL.

        The store documents its tables for plain SQL; filtering in SQLite avoids pulling
        two dense (steps x modules) arrays through Python for a mask that is mostly False.
        """
        try:
            with self._sql() as conn:
                return conn.execute(
                    "SELECT step, module_id FROM module_stats "
                    "WHERE site = ? AND (nan > 0 OR inf > 0)",
                    (site,),
                ).fetchall()
        except sqlite3.Error:
            return None

    @contextlib.contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection of our own to the store's file (its tables are documented
        for plain SQL); raises sqlite3.Error when the file cannot be opened that way."""
        try:
            uri = f"{Path(self.store.path).absolute().as_uri()}?mode=ro"
        except (TypeError, ValueError) as err:
            raise sqlite3.OperationalError(str(err)) from err
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as conn:
            yield conn

    def precision_note(self) -> str | None:
        """``"fp16"``/``"bf16"`` when the run's precision or adapter dtype is half, else None."""
        for key in ("adapter_dtype", "precision"):
            value = str(self.config.get(key, "")).lower()
            if value in HALF_PRECISION:
                return value
        return None


# ---------------------------------------------------------------------- heatmap data


@dataclass
class HeatmapData:
    """Everything a rows x columns heatmap draws; built by ``heatmap_data``.

    ``values`` is ``(rows, columns)``: the max of each bucket of ``steps_per_column``
    steps, NaN where nothing was recorded. ``nonfinite`` marks cells with NaN/Inf
    elements. ``anomaly_x`` are the x positions (column units) of non-warning anomaly
    steps, ``highlight_rows`` the rows of the first offender.
    """

    title: str
    colour_label: str
    row_ids: np.ndarray  # module (or parameter) id of each row, top to bottom
    row_labels: list[str]  # short label of each row
    groups: list[tuple[str, int, int]]  # (label, first_row, stop_row)
    layer_breaks: list[int]  # rows where a new layer / section starts
    values: np.ndarray
    nonfinite: np.ndarray
    col_first: np.ndarray  # first step of each column
    col_last: np.ndarray  # last step of each column
    steps_per_column: int
    anomaly_steps: np.ndarray
    anomaly_x: np.ndarray
    highlight_rows: list[int] = field(default_factory=list)
    highlight_label: str = ""
    guides: tuple[float, ...] = ()  # log10 values marked on the colour bar
    x_what: str = "step (full-trace steps only"  # x-axis label before the bucket note
    row_what: str = "module"


def _downsample(
    steps: np.ndarray, values: np.ndarray, mask: np.ndarray, max_columns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(S, n) arrays -> (n, columns) bucket maxima, any-NaN masks, first/last steps."""
    starts = bucket_starts(len(steps), max_columns)
    vals = np.fmax.reduceat(values, starts, axis=0)  # NaN-ignoring max; all-NaN stays NaN
    bad = np.logical_or.reduceat(mask, starts, axis=0)
    ends = np.r_[starts[1:], len(steps)] - 1
    per = int(starts[1] - starts[0]) if len(starts) > 1 else 1
    return vals.T, bad.T, steps[starts], steps[ends], per


def _layer_breaks(sections: Sequence[tuple]) -> list[int]:
    return [i for i in range(1, len(sections)) if sections[i] != sections[i - 1]]


def heatmap_data(
    view: TraceView, stat: str, site: str, *, max_columns: int = MAX_COLUMNS
) -> HeatmapData | None:
    """Modules x full steps of ``stat`` at ``site`` in display order; None without data.

    Example::

        hd = heatmap_data(TraceView(store), "absmax", "fwd_out")
        hd.highlight_rows      # [row of the first offender], [] when no anomaly named one
    """
    steps, values = view.module_stat(stat, site)
    if len(steps) == 0 or not view.modules:
        return None
    _, mask = view.nonfinite(site)
    mask = mask | np.isinf(values)
    values = np.where(np.isinf(values), np.nan, values)
    if not (np.isfinite(values).any() or mask.any()):
        return None
    order = view.order
    vals, bad, col_first, col_last, per = _downsample(
        steps, values[:, order], mask[:, order], max_columns
    )
    mods = [view.modules[i] for i in order]
    offender = first_offender(view.anomalies)
    rows: list[int] = []
    label = ""
    if offender is not None and 0 <= offender["module_id"] < len(view.modules):
        rows = [int(np.flatnonzero(order == offender["module_id"])[0])]
        label = view.modules[offender["module_id"]].label
    anomaly_steps = np.unique([a["step"] for a in view.hard_anomalies]).astype(np.int64)
    what = f"{_STAT_WORDS.get(stat, stat)} of each module's {_SITE_WORDS.get(site, site)}"
    return HeatmapData(
        title=f"{what[0].upper()}{what[1:]}",
        colour_label=f"log10 {_STAT_WORDS.get(stat, stat)} ({site})",
        row_ids=order,
        row_labels=[short_label(m.label) for m in mods],
        groups=row_groups([group_label(m) for m in mods]),
        layer_breaks=_layer_breaks([(_section(m), m.layer) for m in mods]),
        values=vals,
        nonfinite=bad,
        col_first=col_first,
        col_last=col_last,
        steps_per_column=per,
        anomaly_steps=anomaly_steps,
        anomaly_x=step_columns(col_first, col_last, anomaly_steps),
        highlight_rows=rows,
        highlight_label=label,
    )


def lora_heatmap_data(view: TraceView, *, max_columns: int = MAX_COLUMNS) -> HeatmapData | None:
    """LoRA adapters x steps of ``update_ratio`` (rows in module display order)."""
    adapters = lora_params(view)
    steps, ratio = view.param_stat("update_ratio")
    if not adapters or len(steps) == 0:
        return None
    _, weight_bad = view.param_stat("weight_nonfinite")
    ids = np.array([p.id for p in adapters], dtype=np.int64)
    mask = (weight_bad[:, ids] > 0) | np.isinf(ratio[:, ids])
    values = np.where(np.isinf(ratio[:, ids]), np.nan, ratio[:, ids])
    if not (np.isfinite(values).any() or mask.any()):
        return None
    vals, bad, col_first, col_last, per = _downsample(steps, values, mask, max_columns)
    parents = [_param_module(view, p) for p in adapters]
    offender = first_offender(view.anomalies)
    rows = []
    if offender is not None:
        rows = [i for i, p in enumerate(adapters) if p.module_id == offender["module_id"]]
    anomaly_steps = np.unique([a["step"] for a in view.hard_anomalies]).astype(np.int64)
    return HeatmapData(
        title="LoRA update / weight ratio ||ΔW|| / ||W|| per adapter",
        colour_label="log10 update ratio",
        row_ids=ids,
        row_labels=[short_label(p.label) for p in adapters],
        groups=row_groups([group_label(m) if m else "other" for m in parents]),
        layer_breaks=_layer_breaks([(_section(m), m.layer) if m else (9, None) for m in parents]),
        values=vals,
        nonfinite=bad,
        col_first=col_first,
        col_last=col_last,
        steps_per_column=per,
        anomaly_steps=anomaly_steps,
        anomaly_x=step_columns(col_first, col_last, anomaly_steps),
        highlight_rows=rows,
        highlight_label=view.modules[offender["module_id"]].label if rows else "",
        guides=tuple(math.log10(g) for g in TYPICAL_UPDATE),
        x_what="step (all steps",
        row_what="LoRA tensor",
    )


def _param_module(view: TraceView, param: ParamInfo) -> ModuleInfo | None:
    if param.module_id is None or not 0 <= param.module_id < len(view.modules):
        return None
    return view.modules[param.module_id]


def lora_params(view: TraceView) -> list[ParamInfo]:
    """Trainable LoRA tensors (name contains ``lora_``) in module display order, A before B."""
    rank = {mid: i for i, mid in enumerate(view.order.tolist())}
    adapters = [p for p in view.params if "lora_" in p.name]
    return sorted(
        adapters,
        key=lambda p: (
            rank.get(p.module_id, len(rank)) if p.module_id is not None else len(rank),
            p.id,
        ),
    )


# ---------------------------------------------------------------------- drawing helpers


def new_figure(width: float, height: float) -> MplFigure:
    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.06)
    return fig


def save_figure(fig: MplFigure, out_dir: Path, name: str, title: str, caption: str) -> Figure:
    path = Path(out_dir) / f"{name}.png"
    tmp = path.with_name(f".{name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, facecolor="white")
    tmp.replace(path)
    return Figure(name=name, title=title, path=path, caption=caption)


def _label_positions(
    centers: Sequence[float], min_gap: float, low: float, high: float
) -> list[float]:
    """Nudge sorted label centres apart by ``min_gap`` while staying in [low, high]."""
    pos = list(centers)
    for i in range(1, len(pos)):
        pos[i] = max(pos[i], pos[i - 1] + min_gap)
    if pos and pos[-1] > high:
        pos[-1] = high
        for i in range(len(pos) - 2, -1, -1):
            pos[i] = min(pos[i], pos[i + 1] - min_gap)
    return [max(low, p) for p in pos]


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _step_formatter(col_first: np.ndarray) -> FuncFormatter:
    def fmt(x: float, _pos: int) -> str:
        i = int(round(x))
        return str(int(col_first[i])) if 0 <= i < len(col_first) and abs(x - i) < 1e-6 else ""

    return FuncFormatter(fmt)


def draw_heatmap(hd: HeatmapData, out_dir: Path, name: str, caption: str) -> Figure:
    """Render ``hd`` to ``out_dir/name.png``: log10 colours, magenta NaN/Inf, anomaly lines."""
    n_rows, n_cols = hd.values.shape
    every_row = n_rows <= LABEL_EVERY_ROW
    axes_h = max(2.6, n_rows * 0.15) if every_row else float(np.clip(n_rows * 0.019, 3.6, 8.2))
    fig = new_figure(12.0, axes_h + 2.3)
    ax = fig.add_subplot()

    logv = _log10(hd.values)
    finite = logv[np.isfinite(logv)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    vmin = max(vmin, vmax - MAX_DECADES)  # a stray 1e-30 must not wash out the rest
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    # Values below vmin take the lowest colour; exact zeros alone get the "under" colour.
    shown = np.where(hd.values == 0, vmin - 1.0, np.maximum(logv, vmin))
    cmap = colormaps["viridis"].with_extremes(bad=MISSING_COLOUR, under=ZERO_COLOUR)
    image = ax.imshow(
        np.ma.masked_invalid(shown),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
    )
    if hd.nonfinite.any():
        ax.imshow(
            np.ma.masked_where(~hd.nonfinite, np.ones(hd.nonfinite.shape)),
            aspect="auto",
            interpolation="nearest",
            cmap=ListedColormap([NONFINITE_COLOUR]),
            vmin=0,
            vmax=1,
        )
    breaks = set(hd.layer_breaks)
    for _, start, _stop in hd.groups[1:]:
        if start in breaks:
            ax.axhline(start - 0.5, color="black", lw=1.1)
        else:
            ax.axhline(start - 0.5, color="white", lw=0.7)

    # y axis: every row, or one label per group nudged apart so they never overlap
    if every_row:
        ax.set_yticks(range(n_rows), labels=hd.row_labels, fontsize=7)
        ylabel = hd.row_what
    else:
        rows_per_inch = n_rows / axes_h
        centres = [(start + stop - 1) / 2 for _, start, stop in hd.groups]
        pos = _label_positions(centres, rows_per_inch * 0.115, -0.5, n_rows - 0.5)
        ax.set_yticks(pos, labels=[g[0] for g in hd.groups], fontsize=7)
        ax.tick_params(axis="y", length=0)
        ylabel = f"{n_rows} {hd.row_what}s, grouped by layer and block"
    ax.set_ylabel(ylabel)
    ax.set_ylim(n_rows - 0.5, -0.5)

    # x axis: step numbers of the columns
    ax.xaxis.set_major_locator(_step_locator())
    ax.xaxis.set_major_formatter(_step_formatter(hd.col_first))
    xlabel = hd.x_what
    if hd.steps_per_column > 1:
        xlabel += f"; each column = max over {hd.steps_per_column} steps"
    xlabel += ")"
    ax.set_xlabel(xlabel)
    ax.set_xlim(-0.5, n_cols - 0.5)

    for x in hd.anomaly_x:
        ax.axvline(x, color=ANOMALY_COLOUR, ls="--", lw=1.0, alpha=0.9)
    if len(hd.anomaly_x):
        ax.plot(
            hd.anomaly_x,
            np.full(len(hd.anomaly_x), 1.0),
            transform=ax.get_xaxis_transform(),
            ls="none",
            marker="v",
            ms=7,
            color=ANOMALY_COLOUR,
            clip_on=False,
        )
    for row in hd.highlight_rows:
        ax.add_patch(
            Rectangle((-0.5, row - 0.5), n_cols, 1.0, fill=False, ec="red", lw=1.6, zorder=5)
        )
    if hd.highlight_rows:
        right = ax.secondary_yaxis("right")
        right.set_yticks(
            [hd.highlight_rows[0]],
            labels=[f"◀ first offender: {short_label(hd.highlight_label)}"],
            fontsize=8,
            color="red",
        )
        right.tick_params(axis="y", colors="red", length=4)

    if finite.size:  # a colour bar for an all-NaN/Inf map would only show a dummy range
        cbar = fig.colorbar(image, ax=ax, location="bottom", fraction=0.05, aspect=60, pad=0.02)
        cbar.set_label(hd.colour_label + "; white = exactly 0, grey = not recorded")
        for g in hd.guides:
            if vmin <= g <= vmax:
                cbar.ax.axvline(g, color="black", lw=1.2, ls=":")
    handles = []
    if hd.nonfinite.any():
        handles.append(Patch(fc=NONFINITE_COLOUR, label="NaN/Inf in the tensor"))
    if (np.isnan(hd.values) & ~hd.nonfinite).any():
        handles.append(Patch(fc=MISSING_COLOUR, label="not recorded"))
    if (hd.values == 0).any():
        handles.append(Patch(fc=ZERO_COLOUR, ec="0.6", label="exactly 0"))
    if len(hd.anomaly_x):
        handles.append(
            Line2D([], [], color=ANOMALY_COLOUR, ls="--", marker="v", label="anomaly step")
        )
    if hd.highlight_rows:
        handles.append(Patch(fill=False, ec="red", lw=1.6, label="first offender"))
    if handles:
        ax.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.01),
            ncol=len(handles),
            fontsize=8,
            frameon=False,
            handlelength=1.6,
        )
    shape = f"{_plural(n_rows, 'row')} × {_plural(len(hd.col_first), 'column')}"
    fig.suptitle(f"{hd.title}  ({shape})", fontsize=12)
    return save_figure(fig, out_dir, name, hd.title, caption)


def _step_locator() -> MaxNLocator:
    """Whole-step ticks, even when the run has a single step."""
    return MaxNLocator(nbins=12, integer=True, min_n_ticks=1)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _compact(value: float, _pos: int = 0) -> str:
    return f"{value:.3g}"


def _readable_log_axis(ax) -> None:
    """Plain ``3.5`` tick labels on a log/symlog y axis spanning under ~1.5 decades.

    Matplotlib's default labels a narrow log axis with minor ticks like ``3.5×10^0``.
    """
    scale = ax.get_yscale()
    if scale == "symlog":
        ax.yaxis.set_major_formatter(FuncFormatter(_compact))
        return
    if scale != "log":
        return
    low, high = ax.get_ylim()
    if low > 0 and high > 0 and math.log10(high / low) < 1.0:
        # Under a decade a log axis has at most one power of ten: use plain nice numbers.
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(_compact))
    else:  # the decades are labelled; labelled minor ticks would only crowd them
        ax.yaxis.set_minor_formatter(NullFormatter())


def _mark_nonfinite(ax, x: np.ndarray, colour: str, label: str | None = None) -> None:
    """Crosses at the top of ``ax`` for x positions whose value was NaN/Inf."""
    if len(x) == 0:
        return
    ax.plot(
        x,
        np.full(len(x), 0.96),
        transform=ax.get_xaxis_transform(),
        ls="none",
        marker="X",
        ms=8,
        mec="black",
        mew=0.5,
        color=colour,
        clip_on=False,
        label=label,
        zorder=6,
    )


def _mark_anomalies(ax, steps: np.ndarray, *, top: bool) -> None:
    for s in steps:
        ax.axvline(s, color=ANOMALY_COLOUR, ls="--", lw=0.9, alpha=0.7)
    if top and len(steps):
        ax.plot(
            steps,
            np.full(len(steps), 1.0),
            transform=ax.get_xaxis_transform(),
            ls="none",
            marker="v",
            ms=7,
            color=ANOMALY_COLOUR,
            clip_on=False,
            label="anomaly (NaN/Inf found)",
        )


def _plot_recorded(ax, x: np.ndarray, y: np.ndarray, *, positive: bool = False, **kw) -> None:
    """Plot the finite points only (and only y > 0 for a log axis), joined across the rest.

    Steps without a value (not traced that step, NaN) are left out rather than drawn as
    gaps: with ``--trace-every N`` a gap at every other step would hide the line. NaN/Inf
    values are marked separately by the caller.
    """
    keep = np.isfinite(y) & (y > 0) if positive else np.isfinite(y)
    ax.plot(x[keep], y[keep], **kw)


def _line_style(n_points: int) -> dict:
    return {"marker": "o", "ms": 3.5} if n_points <= 40 else {}


def _layer_colours(layers: Sequence[int]) -> dict[int, tuple]:
    cmap = colormaps["viridis"]
    span = max(1, len(layers) - 1)
    return {layer: cmap(0.9 * i / span) for i, layer in enumerate(layers)}


# ---------------------------------------------------------------------- the figures


def training_curves(view: TraceView, out_dir: Path) -> Figure | None:
    """Loss, learning rate and grad norm with skipped/rolled-back/stopped steps shaded."""
    cols = view.steps
    steps = cols["step"]
    if len(steps) == 0:
        return None
    fig = new_figure(11.0, 8.0)
    axes = fig.subplots(3, 1, sharex=True)
    style = _line_style(len(steps))
    panels = [
        ("loss", "loss", "training loss", "tab:blue"),
        ("lr", "learning rate", "learning rate", "tab:green"),
        (
            "grad_norm",
            "grad norm (log scale)",
            # A Trainer run can only measure gradients after its clip (the store says so).
            f"gradient norm ({view.config.get('grad_norm_measured', 'before clipping')})",
            "tab:orange",
        ),
    ]
    statuses = cols["status"]
    spans: list[tuple[str, int, int]] = []  # (status, first_step, last_step) runs
    for i, status in enumerate(statuses):
        if status in STATUS_STYLE:
            if spans and spans[-1][0] == status and i and statuses[i - 1] == status:
                spans[-1] = (status, spans[-1][1], int(steps[i]))
            else:
                spans.append((status, int(steps[i]), int(steps[i])))
    hard_steps = np.unique([a["step"] for a in view.hard_anomalies]).astype(np.int64)
    warn_steps = np.unique(
        [a["step"] for a in view.anomalies if (a.get("evidence") or {}).get("warning")]
    ).astype(np.int64)
    bad_counts: dict[str, int] = {}
    for ax, (key, ylabel, what, colour) in zip(axes, panels, strict=True):
        y = cols[key]
        for status, first, last in spans:
            ax.axvspan(first - 0.5, last + 0.5, color=STATUS_STYLE[status][0], alpha=0.28, lw=0)
        finite = np.isfinite(y)
        if key == "grad_norm" or (key == "loss" and _spans_decades(y)):
            ax.set_yscale("log")
            _plot_recorded(ax, steps, y, positive=True, color=colour, lw=1.3, label=what, **style)
            if key == "loss":
                ylabel = "loss (log scale)"
        else:
            _plot_recorded(ax, steps, y, color=colour, lw=1.3, label=what, **style)
        bad = steps[~finite]
        bad_counts[key] = len(bad)
        _mark_nonfinite(ax, bad, "red", f"{key} NaN/Inf" if len(bad) else None)
        _mark_anomalies(ax, hard_steps, top=ax is axes[0])
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if not finite.any():
            ax.text(0.5, 0.5, f"no finite {what}", transform=ax.transAxes, ha="center", color="red")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if len(warn_steps):
        axes[0].plot(
            warn_steps,
            np.full(len(warn_steps), 1.0),
            transform=axes[0].get_xaxis_transform(),
            ls="none",
            marker="v",
            ms=7,
            mfc="none",
            mec="#e9c46a",
            clip_on=False,
            label="early warning",
        )
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(_step_locator())
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab, strict=True):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    present = dict.fromkeys(s for s, _, _ in spans)
    for status in present:
        handles.append(Patch(fc=STATUS_STYLE[status][0], alpha=0.5))
        labels.append(STATUS_STYLE[status][1])
    for ax in axes:
        _readable_log_axis(ax)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle("Training curves", fontsize=12)
    counts = {s: int((statuses == s).sum()) for s in STATUS_STYLE if (statuses == s).any()}
    parts = [f"{len(steps)} steps"]
    parts += [f"{n} {STATUS_STYLE[s][1].split(' (')[0]}" for s, n in counts.items()]
    caption = (
        f"Loss, learning rate and gradient norm per optimizer step ({', '.join(parts)}). "
        "Shaded steps were skipped, rolled back or stopped; red dashed lines mark anomalies, "
        "red crosses at the top of a panel are NaN/Inf values (a non-finite loss or grad norm "
        "is shown there, not dropped)."
    )
    if bad_counts.get("loss") or bad_counts.get("grad_norm"):
        caption += (
            f" Non-finite: {bad_counts['loss']} loss and {bad_counts['grad_norm']} "
            "grad-norm values."
        )
    return save_figure(fig, out_dir, "training-curves", "Training curves", caption)


def _spans_decades(y: np.ndarray) -> bool:
    good = y[np.isfinite(y) & (y > 0)]
    return bool(good.size) and float(good.max() / good.min()) > 100.0


def layer_norms(view: TraceView, out_dir: Path) -> Figure | None:
    """Max fwd_out abs-max per Q-Former layer vs the fp16 limit, and attention score maxima."""
    steps, absmax = view.module_stat("absmax", "fwd_out")
    if len(steps) == 0:
        return None
    _, bad = view.nonfinite("fwd_out")
    layers = sorted({m.layer for m in view.modules if m.layer is not None})
    score_steps, scores = view.module_stat("absmax", "score_max")
    attn = [
        m
        for m in (view.modules[i] for i in view.order)
        if np.isfinite(scores[:, m.id]).any() or np.isinf(scores[:, m.id]).any()
    ]
    if not layers and not attn:
        return None
    colours = _layer_colours(layers)
    n_panels = int(bool(layers)) + int(bool(attn))
    fig = new_figure(11.0, 3.9 * n_panels + 1.0)
    axes = list(np.atleast_1d(fig.subplots(n_panels, 1, sharex=True)))
    style = _line_style(len(steps))
    peak = float("nan")
    half = view.precision_note()
    caption_bits = []
    if layers:
        ax = axes[0]
        for layer in layers:
            ids = [m.id for m in view.modules if m.layer == layer]
            curve = np.fmax.reduce(absmax[:, ids], axis=1)
            _plot_recorded(
                ax,
                steps,
                curve,
                positive=True,
                color=colours[layer],
                lw=1.4,
                label=f"layer {layer}",
                **style,
            )
            _mark_nonfinite(ax, steps[bad[:, ids].any(axis=1)], colours[layer])
        finite = absmax[np.isfinite(absmax)]
        peak = float(finite.max()) if finite.size else float("nan")
        if half or peak > 1e3:
            ax.axhline(FP16_MAX, color="red", ls="--", lw=1.3, label="fp16 max 65,504")
            ax.text(
                0.005,
                FP16_MAX,
                " fp16 limit 65,504: larger values become Inf",
                transform=ax.get_yaxis_transform(),
                color="red",
                fontsize=8,
                va="bottom",
            )
        if bad.any():
            ax.plot(
                [], [], ls="none", marker="X", color="0.5", mec="black", label="NaN/Inf in layer"
            )
        _mark_anomalies(ax, np.unique([a["step"] for a in view.hard_anomalies]), top=True)
        ax.set_yscale("log")
        ax.set_ylabel("max |output| in layer\n(abs-max, log scale)")
        ax.set_title(
            "Largest activation per Q-Former layer (max over the layer's modules)", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(
            loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, ncol=1 + len(layers) // 20
        )
        if math.isfinite(peak) and peak > 0:
            caption_bits.append(
                f"The largest activation reached {peak:.3g}, "
                f"{FP16_MAX / peak:.3g}× below the fp16 limit"
                + (f" (this run uses {half})." if half else ".")
            )
    if attn:
        ax = axes[-1]
        attn_layers = sorted({m.layer for m in attn if m.layer is not None})
        acol = _layer_colours(attn_layers)
        # One line per (layer, kind) group: the max over its attention modules (one each
        # in BLIP-2/InstructBLIP, but a custom model may have several).
        groups: dict[str, list[ModuleInfo]] = {}
        for m in attn:
            groups.setdefault(group_label(m), []).append(m)
        for name, members in groups.items():
            ids = [m.id for m in members]
            block = scores[:, ids]
            ys = np.fmax.reduce(np.where(np.isinf(block), np.nan, block), axis=1)
            colour = acol.get(members[0].layer, "0.4")
            _plot_recorded(
                ax,
                score_steps,
                ys,
                color=colour,
                ls="--" if members[0].kind == "cross-attn" else "-",
                lw=1.3,
                label=name if len(members) == 1 else f"{name} (max of {len(members)})",
                **_line_style(len(score_steps)),
            )
            _mark_nonfinite(ax, score_steps[np.isinf(block).any(axis=1)], colour)
        _mark_anomalies(ax, np.unique([a["step"] for a in view.hard_anomalies]), top=not layers)
        finite_scores = np.abs(scores[np.isfinite(scores)])
        if finite_scores.size and finite_scores.max() > 10:
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylabel("max |q·k| (unscaled)\n(symlog: linear below 1)")
        else:
            ax.set_ylabel("max |q·k| (unscaled)")
        ax.set_title(
            "Attention score maximum per layer and block (solid: self, dashed: cross)", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(
            loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, ncol=1 + len(groups) // 20
        )
        top = (
            np.nanmax(np.where(np.isfinite(scores), scores, np.nan))
            if np.isfinite(scores).any()
            else None
        )
        if top is not None:
            caption_bits.append(f"Attention scores peaked at {top:.3g}.")
    for ax in axes:
        _readable_log_axis(ax)
    axes[-1].set_xlabel("step (full-trace steps)")
    axes[-1].xaxis.set_major_locator(_step_locator())
    fig.suptitle("Activation growth per layer", fontsize=12)
    caption = (
        (
            "Top: for each Q-Former layer, the largest |value| any of its modules output at that "
            "step (log scale; darker = shallower layer). A line climbing steadily toward the red "
            "fp16 limit means an overflow is coming; crosses at the top mark NaN/Inf. "
        )
        if layers
        else ""
    )
    if attn:
        caption += (
            "Bottom: the largest |q·k| product per attention module (before the 1/sqrt(d) "
            "scale: the value fp16 must hold); "
            "a fast-growing score saturates the softmax and overflows first. "
        )
    caption += " ".join(caption_bits)
    return save_figure(fig, out_dir, "layer-norms", "Activation growth per layer", caption.strip())


def lora_update_ratio(view: TraceView, out_dir: Path) -> Figure | None:
    """||ΔW||/||W|| per LoRA adapter: lines up to 40 adapters, a heatmap beyond."""
    adapters = lora_params(view)
    if not adapters:
        return None
    title = "LoRA update / weight ratio per adapter"
    guide = (
        "Healthy fine-tuning usually moves each adapter by about 1e-3 to 1e-2 of its norm "
        "per step (dotted guides); ratios near 1 mean the adapter is being rewritten every "
        "step (lr too high), near 0 that it barely trains. lora_B starts at 0, so its first "
        "ratio is undefined and lora_A's first update is 0."
    )
    if len(adapters) > 40:
        hd = lora_heatmap_data(view)
        if hd is None:
            return None
        caption = (
            f"Rows are the {len(adapters)} LoRA tensors grouped by layer and block, columns "
            f"steps; colour is log10 ||ΔW||/||W||, magenta = the update left NaN/Inf in the "
            f"weights (a skip or rollback undoes it afterwards). {guide}"
        )
        return draw_heatmap(hd, out_dir, "lora-update-ratio", caption)
    steps, ratio = view.param_stat("update_ratio")
    _, weight_bad = view.param_stat("weight_nonfinite")
    ids = [p.id for p in adapters]
    if len(steps) == 0 or not (
        (np.isfinite(ratio[:, ids]) & (ratio[:, ids] > 0)).any() or (weight_bad[:, ids] > 0).any()
    ):
        return None
    fig = new_figure(11.0, 5.2)
    ax = fig.add_subplot()
    parents = [_param_module(view, p) for p in adapters]
    layers = sorted({m.layer for m in parents if m is not None and m.layer is not None})
    colours = _layer_colours(layers)
    style = _line_style(len(steps))
    for p, m in zip(adapters, parents, strict=True):
        colour = colours.get(m.layer, "0.4") if m is not None else "0.4"
        ls = "--" if "lora_B" in p.name else "-"
        _plot_recorded(
            ax,
            steps,
            ratio[:, p.id],
            positive=True,
            color=colour,
            ls=ls,
            lw=1.0,
            alpha=0.85,
            **style,
        )
        _mark_nonfinite(ax, steps[(weight_bad[:, p.id] > 0) | np.isinf(ratio[:, p.id])], colour)
    ax.axhspan(*TYPICAL_UPDATE, color="tab:green", alpha=0.08, lw=0)
    for g in TYPICAL_UPDATE:
        ax.axhline(g, color="tab:green", ls=":", lw=1.2)
    _mark_anomalies(ax, np.unique([a["step"] for a in view.hard_anomalies]), top=True)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||ΔW|| / ||W|| (log scale)")
    _readable_log_axis(ax)
    ax.xaxis.set_major_locator(_step_locator())
    ax.grid(True, which="both", alpha=0.25)
    handles = [
        Line2D([], [], color=colours[layer], lw=2, label=f"layer {layer}") for layer in layers
    ]
    handles += [
        Line2D([], [], color="0.3", ls="-", label="LoRA A"),
        Line2D([], [], color="0.3", ls="--", label="LoRA B"),
        Patch(fc="tab:green", alpha=0.25, label="typical 1e-3 – 1e-2"),
    ]
    if (weight_bad[:, ids] > 0).any():
        handles.append(
            Line2D([], [], ls="none", marker="X", color="0.5", mec="black", label="weights NaN/Inf")
        )
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.suptitle(f"{title} ({len(adapters)} LoRA tensors)", fontsize=12)
    caption = (
        f"One line per LoRA tensor (colour: layer; solid A, dashed B), log scale; crosses at "
        f"the top mark steps after which the weights held NaN/Inf. {guide}"
    )
    return save_figure(fig, out_dir, "lora-update-ratio", title, caption)


_HEATMAPS = (
    ("absmax", "fwd_out", "activation abs-max"),
    ("rms", "fwd_out", "activation RMS"),
    ("rms", "grad_out", "gradient RMS"),
)


def _heatmap_caption(hd: HeatmapData, what: str) -> str:
    parts = [
        "Rows are modules grouped by Q-Former layer and block (top to bottom), columns the "
        "full-trace steps"
        + (f" (each the max over {hd.steps_per_column} steps)" if hd.steps_per_column > 1 else "")
        + f"; colour is log10 of the {what}. Look for rows turning yellow over time "
        "(growth) and for magenta cells: NaN/Inf, usually spreading down and to the right "
        "from where it started."
    ]
    if len(hd.anomaly_steps):
        listed = ", ".join(str(s) for s in hd.anomaly_steps[:5].tolist())
        more = "…" if len(hd.anomaly_steps) > 5 else ""
        parts.append(f"Red dashed lines: anomaly steps ({listed}{more}).")
    if hd.highlight_rows:
        parts.append(f"Red outline: the first offender, {hd.highlight_label}.")
    return " ".join(parts)


def make_figures(store: TraceStore, out_dir: Path) -> list[Figure]:
    """Draw every figure the store has data for into ``out_dir``; return them in page order.

    Order: training curves, the three heatmaps (activation abs-max, activation RMS,
    gradient RMS), per-layer activation growth, LoRA update ratios. Figures without data
    (no steps, no full-trace steps, no LoRA adapters) are left out.

    Example::

        with TraceStore.open(run_dir / "trace.db") as store:
            for fig in make_figures(store, run_dir / "report"):
                print(fig.name, fig.path)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    view = TraceView(store)
    if len(view.full_steps):
        view.prefetch("fwd_out", ("absmax", "rms", "nan", "inf"))
        view.prefetch("grad_out", ("rms", "nan", "inf"))
    figures: list[Figure | None] = [training_curves(view, out_dir)]
    for stat, site, what in _HEATMAPS:
        hd = heatmap_data(view, stat, site)
        if hd is not None:
            name = f"heatmap-{site}-{stat}"
            figures.append(draw_heatmap(hd, out_dir, name, _heatmap_caption(hd, what)))
    figures.append(layer_norms(view, out_dir))
    figures.append(lora_update_ratio(view, out_dir))
    return [f for f in figures if f is not None]
