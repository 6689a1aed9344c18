"""The ranks of a torchrun run side by side: one store per rank, merged for the report.

    >>> ranks = open_rank_stores(run_dir)            # [(0, store0), (1, store1)]
    >>> rank_overview(ranks)[1]["origin"]            # did the first NaN start on rank 1?

Rank 0's store drives the main plots (every rank trained the same replica); this
module adds what differs between ranks: each rank's loss (its own slice of the
global batch), its largest activation, where NaN/Inf appeared, and which rank a
NaN was born on. Nothing here imports torch.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from stabilizer.probes.schema import SITES
from stabilizer.reports import Figure
from stabilizer.store import TraceStore, rank_store_paths

RankStores = list[tuple[int, TraceStore]]


def open_rank_stores(run_dir: Path, stack: ExitStack) -> RankStores:
    """Every store of the run, opened read-only and closed when ``stack`` closes."""
    return [
        (rank, stack.enter_context(TraceStore.open(path)))
        for rank, path in rank_store_paths(run_dir)
    ]


def _hard(anomalies: list[dict]) -> list[dict]:
    return [a for a in anomalies if not (a.get("evidence") or {}).get("warning")]


def rank_overview(ranks: RankStores) -> dict[int, dict]:
    """Per rank: store file, steps, non-finite losses, anomalies, the first one, origin."""
    out = {}
    for rank, store in ranks:
        steps = store.steps()
        hard = _hard(store.anomalies())
        first = hard[0] if hard else None
        labels = {m.id: m.label for m in store.modules()}
        module = ""
        if first is not None:
            module = (first.get("evidence") or {}).get("module") or labels.get(
                first.get("module_id"), ""
            )
        out[rank] = {
            "store": store.path.name,
            "steps": len(steps["step"]),
            "nonfinite_loss": int((~np.isfinite(steps["loss"])).sum()),
            "not_ok": int(sum(s != "ok" for s in steps["status"])),
            "anomalies": len(hard),
            "first": first,
            "first_module": module,
            # An "other-rank" anomaly means the NaN arrived through the all-reduce.
            "origin": first is not None and first.get("cause") != "other-rank",
        }
    return out


def nonfinite_ranks_by_module(ranks: RankStores, n_modules: int) -> list[list[int]]:
    """For each module id, the ranks on which any of its tensors was NaN/Inf at any step."""
    found: list[list[int]] = [[] for _ in range(n_modules)]
    for rank, store in ranks:
        bad = np.zeros(n_modules, dtype=bool)
        for site in SITES:
            for stat in ("nan", "inf"):
                # Check-only steps keep the modules that failed, with nan = 1: include them.
                _, counts = store.module_stat(stat, site, full_only=False)
                if counts.shape[1] == n_modules and len(counts):
                    bad |= (np.nan_to_num(counts, nan=0.0) > 0).any(axis=0)
        for i in np.flatnonzero(bad):
            found[int(i)].append(rank)
    return found


def rank_figure(ranks: RankStores, out_dir: Path) -> Figure | None:
    """Loss and largest activation per rank over the steps, NaN/Inf steps marked."""
    if len(ranks) < 2:
        return None
    from stabilizer.reports.plots import new_figure, save_figure

    fig = new_figure(11.0, 6.0)
    loss_ax, act_ax = fig.subplots(2, 1, sharex=True)
    for rank, store in ranks:
        steps = store.steps()
        x, loss = steps["step"], steps["loss"]
        (line,) = loss_ax.plot(x, loss, marker=".", ms=3, lw=1.1, label=f"rank {rank}")
        bad = x[~np.isfinite(loss)]
        if len(bad):
            finite_top = np.nanmax(np.where(np.isfinite(loss), loss, np.nan)) if len(x) else 0
            loss_ax.plot(
                bad,
                np.full(len(bad), finite_top if np.isfinite(finite_top) else 0.0),
                "x",
                color=line.get_color(),
                ms=8,
                mew=2,
                label=f"rank {rank}: loss NaN/Inf",
            )
        full, absmax = store.module_stat("absmax", "fwd_out")
        if len(full):
            with np.errstate(all="ignore"):
                peak = np.nanmax(np.where(np.isfinite(absmax), absmax, np.nan), axis=1)
            act_ax.plot(full, peak, lw=1.1, color=line.get_color(), label=f"rank {rank}")
        for a in _hard(store.anomalies()):
            origin = a.get("cause") != "other-rank"
            for ax in (loss_ax, act_ax):
                ax.axvline(
                    a["step"],
                    color=line.get_color(),
                    ls="-" if origin else ":",
                    lw=1.6 if origin else 1.0,
                    alpha=0.8,
                )
    loss_ax.set_ylabel("loss (own slice)")
    act_ax.set_ylabel("largest |activation|")
    act_ax.set_yscale("log")
    act_ax.set_xlabel("step")
    loss_ax.legend(loc="upper right", fontsize=8)
    act_ax.legend(loc="upper right", fontsize=8)
    caption = (
        "Each rank's training loss on its own slice of the global batch, and the largest "
        "finite module output over all probed modules. Vertical lines mark anomalies in the "
        "rank's colour: solid where the NaN/Inf was born on that rank, dotted where it only "
        "arrived through the gradient all-reduce."
    )
    return save_figure(fig, Path(out_dir), "ranks", "Ranks side by side", caption)
