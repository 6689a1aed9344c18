"""Reports from the trace store alone: PNG plots and one self-contained HTML page.

    >>> from stabilizer.reports import write_report
    >>> write_report(Path("runs/classic"))        # runs/classic/report.html + report/*.png
    PosixPath('runs/classic/report.html')

Nothing here imports torch: a report can be made on a machine that only has the
run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPORT_FILE = "report.html"
FIGURES_DIR = "report"


@dataclass(frozen=True)
class Figure:
    """One PNG of the report."""

    name: str  # file stem, unique in the report, e.g. "heatmap-fwd_out-absmax"
    title: str  # heading shown above it
    path: Path  # the PNG, under run_dir/report/
    caption: str  # one or two sentences: what to look at


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` and its PNGs from the run's trace store(s); return the page.

    A torchrun run has one store per rank (``trace.db`` for rank 0, ``trace.rank<r>.db``):
    the page shows rank 0's plots and tables with every rank's anomalies, a ranks table
    and a ranks-side-by-side plot.
    """
    from contextlib import ExitStack

    from stabilizer.errors import ConfigError

    run_dir = Path(run_dir)
    if not (run_dir / "trace.db").is_file():
        what = "is not a folder" if not run_dir.is_dir() else "has no trace.db"
        raise ConfigError(
            f"{run_dir} {what}: the report is built from a run's trace store; "
            "train with --trace (stabilizer train --trace ...) and pass that run folder"
        )
    from stabilizer.reports.html import render_html
    from stabilizer.reports.plots import make_figures
    from stabilizer.reports.ranks import open_rank_stores, rank_figure

    out_dir = run_dir / FIGURES_DIR
    _check_report_paths(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        ranks = open_rank_stores(run_dir, stack)
        store = ranks[0][1]
        figures = make_figures(store, out_dir)
        by_rank = rank_figure(ranks, out_dir)
        if by_rank is not None:
            figures.insert(1, by_rank)  # right after the training curves
        page = render_html(store, run_dir, figures, ranks=ranks)
    target = run_dir / REPORT_FILE
    tmp = target.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target


def _check_report_paths(run_dir: Path) -> None:
    """Refuse, before any plot is drawn, a run folder where the report cannot land:
    ``report/`` must be a folder (the PNGs go in it) and ``report.html`` a file."""
    from stabilizer.errors import ConfigError

    figures, page = run_dir / FIGURES_DIR, run_dir / REPORT_FILE
    if figures.exists() and not figures.is_dir():
        raise ConfigError(
            f"{figures} is a file, but the report writes its PNG plots into a folder of "
            "that name; move or delete that file, then run `stabilizer report` again"
        )
    if page.is_dir():
        raise ConfigError(
            f"{page} is a folder, but the report is written to a file of that name; move "
            "or delete that folder, then run `stabilizer report` again"
        )
