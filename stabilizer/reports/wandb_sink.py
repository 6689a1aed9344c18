"""Weights & Biases runs from a traced run: written live during training, or exported
afterwards from the trace stores, with the same tags and values as the TensorBoard
events (both are a ``TraceSink``: one computation, two writers).

Runs are offline unless the user has set ``WANDB_MODE``: nothing needs an account or
the network, and ``wandb sync <run folder>/wandb/offline-run-*`` uploads them later.

    >>> export_wandb(Path("runs/classic"))      # one W&B run per rank store
    [PosixPath('runs/classic/wandb/offline-run-20260101_120000-abc123')]

Per step one ``run.log({...}, step=step)`` holds that step's scalars (the tags of
``stabilizer.reports.tensorboard``) and its texts (``anomaly/diagnosis``,
``action/taken``, ``train/status`` as plain strings; several at one step are joined).
The run summary also holds the first anomaly's ``anomaly/first_cause``,
``anomaly/first_module`` and ``anomaly/first_step``. The ``wandb`` package is imported on
first use (``pip install 'stabilizer[wandb]'``): importing this module does not need it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilizer.errors import ConfigError
from stabilizer.reports.plots import hard_anomalies
from stabilizer.reports.tensorboard import TraceSink, feed_store, trace_stores_of
from stabilizer.store import ModuleInfo, ParamInfo, TraceStore

WANDB_PROJECT = "stabilizer"
INSTALL_HINT = "pip install 'stabilizer[wandb]'"


def load_wandb(option: str = "--wandb") -> Any:
    """The ``wandb`` module; ``ConfigError`` naming ``option`` if it is not installed."""
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            f"{option} logs the trace to Weights & Biases, but wandb is not installed "
            f"({err}). Install the extra with: {INSTALL_HINT}"
        ) from None
    return wandb


class WandbSink(TraceSink):
    """Logs one rank's steps, anomalies and actions to one W&B run in ``run_dir``.

    The run is named ``<run folder name>-rank<rank>`` and carries ``config`` (the run's
    config from the store); ``folder`` is its folder (``<run_dir>/wandb/offline-run-...``
    offline). Everything of a step is buffered and logged in one
    ``run.log`` when the next step starts or the sink closes: W&B keeps one row per step
    and refuses rows for a step before the last one logged.

    Example::

        with WandbSink(run_dir, 0, store.modules(), store.params(), config=cfg) as sink:
            sink.write_step(store.read_step(0))
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        modules: Sequence[ModuleInfo],
        params: Sequence[ParamInfo],
        *,
        config: dict | None = None,
        option: str = "--wandb",
    ) -> None:
        wandb = load_wandb(option)
        super().__init__(modules, params)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=WANDB_PROJECT,
            dir=str(self.run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            name=f"{self.run_dir.resolve().name}-rank{rank}",
            config=config or {},
            # A run of the user's own (e.g. the Trainer's W&B callback) stays open beside ours.
            reinit="create_new",
            # The sink logs the trace; the terminal stays the user's (no stream wrapping).
            settings=wandb.Settings(console="off"),
        )
        # Kept now: a finished run no longer answers for its attributes.
        self.folder = Path(self._run.dir).parent
        self._pending_step: int | None = None
        self._pending: dict[str, Any] = {}
        self._first_anomaly: dict | None = None

    # -- the backend -----------------------------------------------------------------

    def _add_scalar(self, tag: str, value: float, step: int, wall: float) -> None:
        self._at_step(step)[tag] = value

    def _add_text(self, tag: str, text: str, step: int, wall: float) -> None:
        row = self._at_step(step)
        row[tag] = f"{row[tag]}\n\n{text}" if tag in row else text

    def _flush(self) -> None:
        pass  # a step's row is logged whole when it is complete (see _at_step)

    def _close(self) -> None:
        try:
            self._log_pending()
            if self._first_anomaly is not None:
                self._run.summary.update(self._first_anomaly)
        finally:
            self._run.finish()

    # W&B shows logged strings as they are: no Markdown escapes or markers.
    def _escape(self, text: Any) -> str:
        return str(text)

    def _strong(self, text: str) -> str:
        return text

    def _code(self, text: str) -> str:
        return text

    # -- events ----------------------------------------------------------------------

    def write_anomaly(self, row: dict) -> None:
        super().write_anomaly(row)
        if self._first_anomaly is None and hard_anomalies([row]):
            module_id = row.get("module_id")
            module = self.modules.get(module_id) if module_id is not None else None
            self._first_anomaly = {
                "anomaly/first_cause": str(row.get("cause")),
                "anomaly/first_module": module.label if module else "none named",
                "anomaly/first_step": int(row["step"]),
            }

    def _at_step(self, step: int) -> dict[str, Any]:
        """The row of ``step``, logging the previous step's row first."""
        if self._pending_step is not None and step != self._pending_step:
            self._log_pending()
        self._pending_step = step
        return self._pending

    def _log_pending(self) -> None:
        if self._pending_step is not None and self._pending:
            self._run.log(self._pending, step=self._pending_step)
        self._pending, self._pending_step = {}, None


def export_wandb(run_dir: Path, *, option: str = "--wandb") -> list[Path]:
    """Log every rank store of ``run_dir`` as its own W&B run; return the run folders.

    Each export is a new W&B run (in ``run_dir/wandb``); earlier exports are kept.

    Example::

        export_wandb(Path("runs/classic"))    # runs/classic/wandb/offline-run-.../
    """
    run_dir = Path(run_dir)
    stores = trace_stores_of(run_dir, "W&B runs are")
    load_wandb(option)  # a missing package fails before anything is written
    folders = []
    for rank, path in stores:
        with TraceStore.open(path) as store:
            config = store.meta().get("config")
            with WandbSink(
                run_dir, rank, store.modules(), store.params(), config=config, option=option
            ) as sink:
                feed_store(store, sink)
            folders.append(sink.folder)
    return folders
