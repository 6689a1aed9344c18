"""The trace store of one run (``runs/<name>/trace.db``): every step's numbers, in SQLite.

The trainer writes one transaction per step; reports and the CLI read the same file,
even while training runs, without torch. SQLite runs in WAL mode with
``synchronous=NORMAL``: a writer killed with SIGKILL loses at most the step it was
writing; every committed step, anomaly and action stays readable. Opening or reading
a store damaged later (a cut-off copy, a failing disk) raises a ``StoreError`` that
says so and that the run's checkpoints are separate; a file that never was a store
is told apart from it (by its SQLite header and the stabilizer tables in its schema).

Tables (plain SQL works: ``sqlite3 trace.db "SELECT step, loss FROM steps"``):

| table        | one row per                      | columns (PK first)                           |
|--------------|----------------------------------|----------------------------------------------|
| meta         | key                              | key TEXT PK, value TEXT (JSON): config,      |
|              |                                  | schema_version (1), created, stat names      |
| modules      | traced module (id = array row)   | id INTEGER PK (0..n-1), name TEXT UNIQUE,    |
|              |                                  | label, kind, layer NULL, component,          |
|              |                                  | is_attention (0/1)                           |
| params       | trainable parameter (id = row)   | id INTEGER PK (0..n-1), name TEXT UNIQUE,    |
|              |                                  | label, module_id NULL, numel, dtype          |
| steps        | optimizer step                   | step INTEGER PK, loss, lr, grad_norm, status,|
|              |                                  | full (0/1), wall_time (unix s), extra (JSON) |
| module_stats | (step, module, site) that fired  | PK (step, module_id, site) WITHOUT ROWID,    |
|              |                                  | fire_order, absmax, rms, mean, nan, inf,     |
|              |                                  | near_limit; site score_max: value in absmax  |
| param_stats  | (step, parameter)                | PK (step, param_id) WITHOUT ROWID,           |
|              |                                  | weight_norm, grad_norm, update_ratio,        |
|              |                                  | weight_nonfinite, grad_nonfinite             |
| anomalies    | detected anomaly                 | id PK, step, pass, module_id NULL, op NULL,  |
|              |                                  | cause, summary, fix, evidence (JSON), created|
| actions      | thing a policy did               | id PK, step, action, detail, created         |

Indexes: module_stats (site, step), anomalies (step), actions (step).

``status`` is one of ``STEP_STATUSES``; ``full`` is 1 when per-module statistics were
recorded that step (``--trace-every N``), 0 when only finiteness was checked. Sites are
``schema.SITES`` plus ``score_max``; stats are ``schema.TENSOR_STATS`` / ``PARAM_STATS``.
A site that did not fire has no row (readers return NaN for it). SQLite cannot hold NaN
in a REAL column (it turns it into NULL), so NaN is stored as NULL and read back as NaN;
+/-Inf is stored as is. JSON columns use Python's ``json`` (non-finite floats become the
tokens ``NaN``/``Infinity``, which Python reads back but SQLite's ``json_extract`` before
3.42 rejects).

Example::

    with TraceStore.create(run_dir / "trace.db", meta={"config": cfg.to_dict()}) as store:
        store.register_modules(modules)
        store.register_params(params)
        store.append_step(StepData(step=0, loss=2.3, lr=1e-4, grad_norm=0.8, ...))

    with TraceStore.open(run_dir / "trace.db") as store:     # read-only, no torch
        steps, absmax = store.module_stat("absmax", "fwd_out")  # (S,), (S, n_modules)
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stabilizer.errors import StabilizerError
from stabilizer.probes.schema import PARAM_STATS, PASSES, SITES, TENSOR_STATS

SCHEMA_VERSION = 1
SCORE_SITE = "score_max"
STEP_STATUSES = ("ok", "skipped", "rolled_back", "anomaly", "stopped", "repaired")
ACTIONS = ("skip", "clip", "rollback", "raise", "stop", "warn", "replay", "repair")
# Documented vocabulary for ModuleInfo.kind; not enforced so that new kinds need no migration.
MODULE_KINDS = ("self-attn", "cross-attn", "ffn", "projection", "lora", "other")
# Keys the store writes itself; callers' meta may not reuse them.
RESERVED_META = ("schema_version", "created", "tensor_stats", "sites", "param_stats")

_DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS modules (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE, label TEXT, kind TEXT, layer INTEGER NULL,
    component TEXT, is_attention INTEGER);
CREATE TABLE IF NOT EXISTS params (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE, label TEXT, module_id INTEGER NULL,
    numel INTEGER, dtype TEXT);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, loss REAL, lr REAL, grad_norm REAL, status TEXT,
    full INTEGER, wall_time REAL, extra TEXT);
CREATE TABLE IF NOT EXISTS module_stats (
    step INTEGER, module_id INTEGER, site TEXT, fire_order INTEGER,
    {", ".join(f"{s} REAL" for s in TENSOR_STATS)},
    PRIMARY KEY (step, module_id, site)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS param_stats (
    step INTEGER, param_id INTEGER, {", ".join(f"{s} REAL" for s in PARAM_STATS)},
    PRIMARY KEY (step, param_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS anomalies (
    id INTEGER PRIMARY KEY, step INTEGER, pass TEXT, module_id INTEGER NULL, op TEXT NULL,
    cause TEXT, summary TEXT, fix TEXT, evidence TEXT, created REAL);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY, step INTEGER, action TEXT, detail TEXT, created REAL);
-- module_stat() reads one site across all steps.
CREATE INDEX IF NOT EXISTS module_stats_site_step ON module_stats (site, step);
CREATE INDEX IF NOT EXISTS anomalies_step ON anomalies (step);
CREATE INDEX IF NOT EXISTS actions_step ON actions (step);
"""

_MODULE_INSERT = (
    f"INSERT INTO module_stats (step, module_id, site, fire_order, {', '.join(TENSOR_STATS)}) "
    f"VALUES ({', '.join('?' * (4 + len(TENSOR_STATS)))})"
)
_PARAM_INSERT = (
    f"INSERT INTO param_stats (step, param_id, {', '.join(PARAM_STATS)}) "
    f"VALUES ({', '.join('?' * (2 + len(PARAM_STATS)))})"
)


TRACE_FILE = "trace.db"
# Under torchrun each rank writes its own store: rank 0 keeps the single-process name
# (so every reader of trace.db works unchanged), rank r > 0 writes trace.rank<r>.db.
_RANK_FILE = "trace.rank{rank}.db"


def store_path(run_dir: Path, rank: int = 0) -> Path:
    """Where rank ``rank`` of a run writes its store (``trace.db`` for rank 0)."""
    return Path(run_dir) / (TRACE_FILE if rank == 0 else _RANK_FILE.format(rank=rank))


def rank_store_paths(run_dir: Path) -> list[tuple[int, Path]]:
    """Every store of a run as ``(rank, path)``, rank 0 first; ``[]`` if it has none.

    A single-process run has one entry, ``(0, run_dir/trace.db)``.
    """
    run_dir = Path(run_dir)
    found = []
    if (run_dir / TRACE_FILE).is_file():
        found.append((0, run_dir / TRACE_FILE))
    for path in run_dir.glob("trace.rank*.db"):
        digits = path.name[len("trace.rank") : -len(".db")]
        if digits.isdigit() and int(digits) > 0:
            found.append((int(digits), path))
    return sorted(found)


class StoreError(StabilizerError):
    """The trace store is missing, is not a trace store, or was used wrongly.

    The message names the file and says what to do.
    """


_SQLITE_MAGIC = b"SQLite format 3\x00"
# Names only a stabilizer store's schema holds; SQLite keeps the schema's SQL text on
# page 1, so they are still there when the header before them was overwritten.
_SCHEMA_MARKS = (b"module_stats", b"param_stats", b"fire_order")
_SCHEMA_PAGE_BYTES = 65536  # the largest SQLite page


def _reads(method):
    """A reader whose query meets a damaged page raises a StoreError that says so.

    Only readers: writers let sqlite3's errors through, because the training loop
    tells a full disk by them (``rundir.is_disk_full``).
    """

    @functools.wraps(method)
    def wrapper(self: TraceStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as err:
            raise _unreadable(self.path, err) from err
        except json.JSONDecodeError as err:  # a JSON column cut or overwritten
            raise _damaged(self.path, f"a JSON value in it is unreadable ({err})") from err

    return wrapper


def _unreadable(path: Path, err: sqlite3.DatabaseError) -> StoreError:
    """The StoreError for a file SQLite could not read: damaged store, or never one."""
    head = _file_head(path)
    size = _file_size(path)
    ours = any(mark in head for mark in _SCHEMA_MARKS)
    if not head.startswith(_SQLITE_MAGIC):
        if ours:
            return _damaged(path, f"its SQLite header is overwritten: {err}")
        return StoreError(
            f"{path} is not a stabilizer trace store: it is not an SQLite file ({err}). "
            "Point at a run's trace.db"
        )
    expected = _size_in_header(head)
    if expected is not None and size < expected:
        return _damaged(path, f"truncated: {size:,} of its {expected:,} bytes are there")
    if ours or _is_corruption(err):
        return _damaged(path, str(err))
    return StoreError(f"{path}: cannot read the trace store ({err})")


def _damaged(path: Path, why: str) -> StoreError:
    """What is lost (this trace) and what is not (the checkpoints), and what to do."""
    name = path.name
    return StoreError(
        f"{path} is a damaged stabilizer trace store ({why}). Only the trace is lost: "
        "the run's checkpoints (checkpoints/step-*/) and metrics.jsonl are separate "
        f"files, so `stabilizer eval` still works, and after `mv {name} {name}.damaged` "
        "`stabilizer train --resume` continues from the last checkpoint, tracing the "
        f"steps after it into a new {name}. `sqlite3 {name}.damaged .recover | sqlite3 "
        "recovered.db` may salvage the rows that are still readable"
    )


def _file_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_SCHEMA_PAGE_BYTES)
    except OSError:
        return b""


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _size_in_header(head: bytes) -> int | None:
    """The database size the SQLite header records, or None where it is not reliable."""
    if len(head) < 100:
        return None
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    # The page count is valid only while "version-valid-for" equals the change counter.
    if head[24:28] != head[92:96] or not pages:
        return None
    return page_size * pages


def _is_corruption(err: sqlite3.DatabaseError) -> bool:
    """SQLite's "database disk image is malformed" or "file is not a database"."""
    if getattr(err, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return True  # Python >= 3.11 names the error; older ones only word it
    return any(words in str(err) for words in ("malformed", "not a database"))


@dataclass(frozen=True)
class ModuleInfo:
    """One traced module. ``id`` is its row in every per-module stats array.

    Example::

        ModuleInfo(id=3, name="base_model.model.qformer.encoder.layer.3.crossattention"
                   ".attention.key.lora_B.default",
                   label="Q-Former layer 3 cross-attention key (LoRA B)", kind="lora",
                   layer=3, component="qformer", is_attention=False)
    """

    id: int
    name: str
    label: str
    kind: str
    layer: int | None
    component: str
    is_attention: bool


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter. ``id`` is its row in ``StepData.param_stats``."""

    id: int
    name: str
    label: str
    module_id: int | None
    numel: int
    dtype: str


@dataclass
class StepData:
    """Everything recorded for one optimizer step.

    ``module_stats[site]`` is a float array ``(n_modules, len(TENSOR_STATS))`` whose row i
    belongs to module id i; ``fire_order[site]`` an int array ``(n_modules,)``, -1 where the
    site did not fire (those rows are not stored). Every site in ``module_stats`` needs a
    ``fire_order`` entry. ``score_max`` is ``(n_modules,)``, NaN where there is no score.
    ``param_stats`` is ``(n_params, len(PARAM_STATS))``. ``wall_time`` defaults to the time
    ``append_step`` is called.

    Example::

        StepData(step=7, loss=float("nan"), lr=1e-4, grad_norm=float("inf"),
                 status="anomaly", full=False)
    """

    step: int
    loss: float
    lr: float
    grad_norm: float
    status: str = "ok"
    full: bool = True
    module_stats: dict[str, np.ndarray] = field(default_factory=dict)
    fire_order: dict[str, np.ndarray] = field(default_factory=dict)
    score_max: np.ndarray | None = None
    param_stats: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    wall_time: float | None = None


class TraceStore:
    """One run's trace database. Build it with ``create`` (writer) or ``open`` (reader).

    Example::

        store = TraceStore.create(path, meta={"config": cfg})   # or append=True on resume
        store.register_modules(modules); store.register_params(params)
        for step in ...:
            store.append_step(StepData(...))
        store.close()
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, *, readonly: bool) -> None:
        # Use create() / open(); this only wires up an already validated connection.
        self.path = path
        self.readonly = readonly
        self._conn = conn
        self._n_modules = self._count("modules")
        self._n_params = self._count("params")

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(
        cls, path: Path, *, meta: dict, overwrite: bool = False, append: bool = False
    ) -> TraceStore:
        """Create a new store at ``path`` for writing.

        An existing file is an error unless ``overwrite=True`` (start afresh) or
        ``append=True`` (resume: keep its contents, update the given meta keys; pair it with
        ``delete_steps_after(checkpoint_step)``).

        Example::

            store = TraceStore.create(run_dir / "trace.db", meta={"config": cfg.to_dict()},
                                      append=resume)
        """
        path = Path(path)
        if overwrite and append:
            raise StoreError(f"{path}: pass overwrite=True or append=True, not both")
        bad = sorted(set(meta) & set(RESERVED_META))
        if bad:
            raise StoreError(f"meta keys {bad} are reserved by the trace store; rename them")
        exists = path.exists()
        if exists and not (overwrite or append):
            raise StoreError(
                f"{path} already exists. Resume the run to append to it, or remove it "
                "to start a new trace"
            )
        if exists and overwrite:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            exists = False
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path, readonly=False)
        try:
            if exists:
                _check_is_store(conn, path)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"{path}: SQLite refused WAL mode ({mode}); put the run folder on a local disk"
                )
            # NORMAL in WAL mode: commits survive a killed process; only an OS crash or
            # power loss can drop the last few, and it saves an fsync per step.
            conn.execute("PRAGMA synchronous=NORMAL")
            with _transaction(conn):
                _run_ddl(conn)
                own = {
                    "tensor_stats": list(TENSOR_STATS),
                    "sites": [*SITES, SCORE_SITE],
                    "param_stats": list(PARAM_STATS),
                }
                if not exists:
                    own |= {"schema_version": SCHEMA_VERSION, "created": time.time()}
                _put_meta(conn, {**meta, **own})
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, readonly=False)

    @classmethod
    def open(cls, path: Path) -> TraceStore:
        """Open an existing store read-only (safe while the trainer is still writing it).

        Example::

            with TraceStore.open(Path("runs/latest/trace.db")) as store:
                print(store.steps()["loss"])
        """
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path}: no trace store there. Check the run folder name")
        conn = _connect(path, readonly=True)
        try:
            _check_is_store(conn, path)
            return cls(path, conn, readonly=True)
        except sqlite3.DatabaseError as err:  # the tables past meta may be damaged too
            conn.close()
            raise _unreadable(path, err) from err
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close the connection; a writer first folds the WAL into the db file.

        Leaving WAL mode on a clean close makes ``trace.db`` one self-contained file
        (copying it alone loses nothing) and later read-only opens leave no
        ``-wal``/``-shm`` files behind. ``create(..., append=True)`` turns WAL on again.
        """
        if not self.readonly:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA journal_mode=DELETE")
        self._conn.close()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def set_meta(self, **values: Any) -> None:
        """Set meta keys (JSON values), committed at once: ``store.set_meta(finished=t)``."""
        self._writable()
        with _transaction(self._conn):
            _put_meta(self._conn, values)

    def register_modules(self, modules: Sequence[ModuleInfo]) -> None:
        """Record the traced modules; ids must end up 0..n-1 (they index the arrays).

        Registering the same module again (resume) is a no-op that refreshes its label;
        a different name under a known id is an error.
        """
        rows = [
            (m.id, m.name, m.label, m.kind, m.layer, m.component, int(bool(m.is_attention)))
            for m in modules
        ]
        self._register("modules", rows, "name, label, kind, layer, component, is_attention")
        self._n_modules = self._count("modules")

    def register_params(self, params: Sequence[ParamInfo]) -> None:
        """Record the trainable parameters; ids must end up 0..n-1 (they index the arrays)."""
        rows = [(p.id, p.name, p.label, p.module_id, int(p.numel), p.dtype) for p in params]
        self._register("params", rows, "name, label, module_id, numel, dtype")
        self._n_params = self._count("params")

    def append_step(self, data: StepData, *, replace: bool = False) -> None:
        """Write one step in one transaction: only fired sites, every parameter.

        A step already in the store is an error unless ``replace=True`` (e.g. a step re-run
        after a rollback), which drops its old rows first.

        Example::

            store.append_step(StepData(step=s, loss=loss, lr=lr, grad_norm=gn,
                                       module_stats=stats, fire_order=order,
                                       score_max=scores, param_stats=pstats))
        """
        self._writable()
        if data.status not in STEP_STATUSES:
            raise StoreError(f"step {data.step}: status {data.status!r} not in {STEP_STATUSES}")
        module_rows = self._module_rows(data)
        param_rows = self._param_rows(data)
        step = int(data.step)
        step_row = (
            step,
            float(data.loss),
            float(data.lr),
            float(data.grad_norm),
            data.status,
            int(bool(data.full)),
            time.time() if data.wall_time is None else float(data.wall_time),
            _dumps(data.extra),
        )
        conn = self._conn
        with _transaction(conn):
            if replace:
                _delete_steps(conn, "= ?", step, events=False)
            elif conn.execute("SELECT 1 FROM steps WHERE step = ?", (step,)).fetchone():
                raise StoreError(
                    f"{self.path}: step {step} is already recorded. On resume call "
                    "delete_steps_after(checkpoint_step) first, or pass replace=True"
                )
            conn.execute("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?)", step_row)
            conn.executemany(_MODULE_INSERT, module_rows)
            conn.executemany(_PARAM_INSERT, param_rows)

    def append_anomaly(
        self,
        *,
        step: int,
        pass_: str,
        module_id: int | None,
        op: str | None,
        cause: str,
        summary: str,
        fix: str,
        evidence: dict,
    ) -> int:
        """Record an anomaly, committed at once (it must survive the crash it may precede).

        Returns its id. ``pass_`` is one of ``schema.PASSES``.

        Example::

            store.append_anomaly(step=412, pass_="forward", module_id=57, op="softmax",
                                 cause="overflow", summary="attention scores hit Inf",
                                 fix="lower the lr", evidence={"score_max": float("inf")})
        """
        self._writable()
        if pass_ not in PASSES:
            raise StoreError(f"anomaly at step {step}: pass {pass_!r} not in {PASSES}")
        row = (
            int(step),
            pass_,
            None if module_id is None else int(module_id),
            op,
            cause,
            summary,
            fix,
            _dumps(evidence),
            time.time(),
        )
        with _transaction(self._conn):
            cur = self._conn.execute(
                "INSERT INTO anomalies (step, pass, module_id, op, cause, summary, fix, "
                "evidence, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        return int(cur.lastrowid)

    def append_action(self, *, step: int, action: str, detail: str) -> None:
        """Record what a policy did (one of ``ACTIONS``), committed at once.

        Example::

            store.append_action(step=412, action="skip", detail="non-finite grad_norm")
        """
        self._writable()
        if action not in ACTIONS:
            raise StoreError(f"action {action!r} at step {step} not in {ACTIONS}")
        with _transaction(self._conn):
            self._conn.execute(
                "INSERT INTO actions (step, action, detail, created) VALUES (?, ?, ?, ?)",
                (int(step), action, detail, time.time()),
            )

    def delete_steps_after(self, step: int, *, keep_events: bool = False) -> None:
        """Drop every step > ``step`` with its stats, in one transaction (resume).

        Anomalies and actions after ``step`` go too, so a resumed run that meets them
        again does not list them twice; ``keep_events=True`` keeps them.

        Example::

            store = TraceStore.create(path, meta=meta, append=True)
            store.delete_steps_after(checkpoint_step)
        """
        self._writable()
        with _transaction(self._conn):
            _delete_steps(self._conn, "> ?", int(step), events=not keep_events)

    # ------------------------------------------------------------------ reading

    @_reads
    def meta(self) -> dict:
        """All meta keys with their decoded JSON values."""
        return {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}

    @_reads
    def modules(self) -> list[ModuleInfo]:
        """The registered modules ordered by id (list index == id)."""
        rows = self._conn.execute(
            "SELECT id, name, label, kind, layer, component, is_attention FROM modules ORDER BY id"
        )
        return [ModuleInfo(*r[:6], is_attention=bool(r[6])) for r in rows]

    @_reads
    def params(self) -> list[ParamInfo]:
        """The registered parameters ordered by id (list index == id)."""
        rows = self._conn.execute(
            "SELECT id, name, label, module_id, numel, dtype FROM params ORDER BY id"
        )
        return [ParamInfo(*r) for r in rows]

    @_reads
    def steps(self) -> dict[str, np.ndarray]:
        """The step table as columns, ordered by step.

        ``step`` int64; ``loss``, ``lr``, ``grad_norm``, ``wall_time`` float64 (NaN for
        NULL); ``full`` bool; ``status`` and ``extra`` (decoded dicts) object arrays.

        Example::

            cols = store.steps(); bad = cols["step"][~np.isfinite(cols["loss"])]
        """
        rows = self._conn.execute(
            "SELECT step, loss, lr, grad_norm, full, wall_time, status, extra FROM steps "
            "ORDER BY step"
        ).fetchall()
        nums = np.array([r[:6] for r in rows], dtype=float).reshape(len(rows), 6)
        return {
            "step": nums[:, 0].astype(np.int64),
            "loss": nums[:, 1],
            "lr": nums[:, 2],
            "grad_norm": nums[:, 3],
            "full": nums[:, 4] == 1,
            "wall_time": nums[:, 5],
            "status": _object_array([r[6] for r in rows]),
            "extra": _object_array([json.loads(r[7]) if r[7] else {} for r in rows]),
        }

    @_reads
    def module_stat(
        self, stat: str, site: str, *, full_only: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """One statistic of one site for every module over the steps.

        Returns ``(steps, values)``: ``steps`` int64 ``(S,)`` (only ``full`` steps unless
        ``full_only=False``) and ``values`` float64 ``(S, n_modules)``, NaN where the site
        did not fire or the value was NaN. ``stat`` is one of ``TENSOR_STATS`` or
        ``"fire_order"``; ``site`` one of ``SITES`` or ``"score_max"`` (with stat
        ``"absmax"``).

        Example::

            steps, absmax = store.module_stat("absmax", "grad_out")
            first_inf_step = steps[np.isinf(absmax).any(axis=1)][:1]
        """
        if site == SCORE_SITE:
            if stat != "absmax":
                raise StoreError(f"site {SCORE_SITE!r} only has stat 'absmax', not {stat!r}")
        elif site not in SITES:
            raise StoreError(f"unknown site {site!r}; expected one of {(*SITES, SCORE_SITE)}")
        if stat not in TENSOR_STATS and stat != "fire_order":
            raise StoreError(f"unknown stat {stat!r}; expected one of {TENSOR_STATS}")
        where = "WHERE full = 1" if full_only else ""
        steps = self._step_numbers(where)
        # Column name comes from the validated tuple above, never from the caller verbatim.
        rows = self._conn.execute(
            f"SELECT step, module_id, {stat} FROM module_stats WHERE site = ?"
            + (" AND step IN (SELECT step FROM steps WHERE full = 1)" if full_only else ""),
            (site,),
        ).fetchall()
        return steps, _fill(steps, rows, self._count("modules"))

    @_reads
    def param_stat(self, stat: str) -> tuple[np.ndarray, np.ndarray]:
        """One parameter statistic over all steps: ``(steps (S,), values (S, n_params))``.

        NaN where a step recorded no parameter stats or the value was NaN.

        Example::

            steps, grad = store.param_stat("grad_norm")
        """
        if stat not in PARAM_STATS:
            raise StoreError(f"unknown param stat {stat!r}; expected one of {PARAM_STATS}")
        steps = self._step_numbers("")
        rows = self._conn.execute(f"SELECT step, param_id, {stat} FROM param_stats").fetchall()
        return steps, _fill(steps, rows, self._count("params"))

    @_reads
    def read_step(self, step: int) -> StepData:
        """Rebuild one step's ``StepData`` (sites with no fired module are left out).

        Example::

            data = store.read_step(412); data.module_stats["fwd_out"][57]
        """
        conn = self._conn
        head = conn.execute(
            "SELECT loss, lr, grad_norm, status, full, wall_time, extra FROM steps WHERE step = ?",
            (int(step),),
        ).fetchone()
        if head is None:
            raise StoreError(f"{self.path}: step {step} is not recorded")
        n_mod, n_par = self._count("modules"), self._count("params")
        data = StepData(
            step=int(step),
            loss=_float(head[0]),
            lr=_float(head[1]),
            grad_norm=_float(head[2]),
            status=head[3],
            full=bool(head[4]),
            extra=json.loads(head[6]) if head[6] else {},
            wall_time=_float(head[5]),
        )
        cols = ", ".join(TENSOR_STATS)
        for mid, site, order, *vals in conn.execute(
            f"SELECT module_id, site, fire_order, {cols} FROM module_stats WHERE step = ?",
            (int(step),),
        ):
            if site == SCORE_SITE:
                if data.score_max is None:
                    data.score_max = np.full(n_mod, np.nan)
                data.score_max[mid] = _float(vals[0])
                continue
            if site not in data.module_stats:
                data.module_stats[site] = np.full((n_mod, len(TENSOR_STATS)), np.nan)
                data.fire_order[site] = np.full(n_mod, -1, dtype=np.int64)
            data.module_stats[site][mid] = np.array(vals, dtype=float)
            data.fire_order[site][mid] = order
        prows = conn.execute(
            f"SELECT param_id, {', '.join(PARAM_STATS)} FROM param_stats WHERE step = ?",
            (int(step),),
        ).fetchall()
        if prows:
            data.param_stats = np.full((n_par, len(PARAM_STATS)), np.nan)
            arr = np.array(prows, dtype=float)
            data.param_stats[arr[:, 0].astype(np.int64)] = arr[:, 1:]
        return data

    @_reads
    def anomalies(self) -> list[dict]:
        """Every anomaly in order of recording, ``evidence`` decoded.

        Keys: id, step, pass, module_id, op, cause, summary, fix, evidence, created.
        """
        cur = self._conn.execute(
            "SELECT id, step, pass, module_id, op, cause, summary, fix, evidence, created "
            "FROM anomalies ORDER BY id"
        )
        names = [d[0] for d in cur.description]
        out = [dict(zip(names, row, strict=True)) for row in cur]
        for a in out:
            a["evidence"] = json.loads(a["evidence"]) if a["evidence"] else {}
        return out

    @_reads
    def actions(self) -> list[dict]:
        """Every policy action in order: dicts with id, step, action, detail, created."""
        cur = self._conn.execute(
            "SELECT id, step, action, detail, created FROM actions ORDER BY id"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]

    # ------------------------------------------------------------------ helpers

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only; use TraceStore.create to write")

    def _count(self, table: str) -> int:
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def _step_numbers(self, where: str) -> np.ndarray:
        rows = self._conn.execute(f"SELECT step FROM steps {where} ORDER BY step").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def _register(self, table: str, rows: list[tuple], cols: str) -> None:
        """Insert new rows, accept identical re-registrations, refuse conflicts."""
        self._writable()
        names = cols.split(", ")
        with _transaction(self._conn):
            known = dict(self._conn.execute(f"SELECT id, name FROM {table}"))
            for row in rows:
                if row[0] in known and known[row[0]] != row[1]:
                    raise StoreError(
                        f"{self.path}: {table[:-1]} id {row[0]} is {known[row[0]]!r}, not "
                        f"{row[1]!r}. The model changed since this trace began; start a "
                        "new run"
                    )
            self._conn.executemany(
                f"INSERT INTO {table} (id, {cols}) VALUES ({', '.join('?' * (len(names) + 1))}) "
                f"ON CONFLICT(id) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in names[1:]),
                rows,
            )
            count, low, top = self._conn.execute(
                f"SELECT COUNT(*), MIN(id), MAX(id) FROM {table}"
            ).fetchone()
            # Unique ids from 0 to count-1 leave no gaps: arrays can be indexed by id.
            if count and (low != 0 or top != count - 1):
                raise StoreError(
                    f"{self.path}: {table} ids must be 0..n-1 (row i of a stats array is id "
                    f"i); got {count} ids from {low} to {top}"
                )

    def _module_rows(self, data: StepData) -> list[tuple]:
        """Rows for module_stats: only the (module, site) pairs that fired."""
        rows: list[tuple] = []
        step, n = int(data.step), self._n_modules
        for site, stats in data.module_stats.items():
            if site not in SITES:
                raise StoreError(f"step {step}: unknown site {site!r}; expected one of {SITES}")
            if site not in data.fire_order:
                raise StoreError(f"step {step}: site {site!r} has stats but no fire_order")
            stats = np.asarray(stats, dtype=float)
            order = np.asarray(data.fire_order[site])
            if stats.shape != (n, len(TENSOR_STATS)) or order.shape != (n,):
                raise StoreError(
                    f"step {step}, site {site!r}: expected stats ({n}, {len(TENSOR_STATS)}) "
                    f"and fire_order ({n},) for the {n} registered modules; got "
                    f"{stats.shape} and {order.shape}"
                )
            idx = np.flatnonzero(order >= 0)
            # tolist() hands sqlite plain Python numbers; NaN becomes NULL on insert.
            rows.extend(
                (step, mid, site, fo, *vals)
                for mid, fo, vals in zip(
                    idx.tolist(), order[idx].tolist(), stats[idx].tolist(), strict=True
                )
            )
        if data.score_max is not None:
            scores = np.asarray(data.score_max, dtype=float)
            if scores.shape != (n,):
                raise StoreError(f"step {step}: score_max shape {scores.shape}, expected ({n},)")
            idx = np.flatnonzero(~np.isnan(scores))
            pad = (None,) * (len(TENSOR_STATS) - 1)
            rows.extend(
                (step, mid, SCORE_SITE, None, val, *pad)
                for mid, val in zip(idx.tolist(), scores[idx].tolist(), strict=True)
            )
        return rows

    def _param_rows(self, data: StepData) -> list[tuple]:
        if data.param_stats is None:
            return []
        stats = np.asarray(data.param_stats, dtype=float)
        expected = (self._n_params, len(PARAM_STATS))
        if stats.shape != expected:
            raise StoreError(
                f"step {data.step}: param_stats shape {stats.shape}, expected {expected}"
            )
        step = int(data.step)
        return [(step, pid, *vals) for pid, vals in enumerate(stats.tolist())]


# ---------------------------------------------------------------------- module helpers


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Autocommit connection (we open transactions ourselves); read-only via a URI."""
    target = f"{path.absolute().as_uri()}?mode=ro" if readonly else str(path)
    try:
        return sqlite3.connect(target, uri=readonly, isolation_level=None, timeout=10.0)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: cannot open the trace store ({err})") from err


def _run_ddl(conn: sqlite3.Connection) -> None:
    # executescript() would COMMIT our open transaction; run statement by statement.
    for statement in _DDL.split(";"):
        if statement.strip():
            conn.execute(statement)


def _check_is_store(conn: sqlite3.Connection, path: Path) -> None:
    """Raise StoreError naming ``path`` unless it is a trace store this code can read.

    The error tells a damaged or truncated store (the trace is lost, the run is not)
    from a file that never was a store (the user pointed at the wrong file).
    """
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        row = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        raise _unreadable(path, err) from err
    if not tables and _file_size(path) == 0:
        # SQLite takes an empty file for an empty database; a store never is one.
        raise _damaged(path, "the file is empty (0 bytes)")
    if not tables:
        raise StoreError(
            f"{path} is an SQLite file with no tables, not a stabilizer trace store. "
            "Point at the trace.db that `stabilizer train --trace` writes in a run folder"
        )
    if row is None:
        raise StoreError(f"{path} is an SQLite file but not a stabilizer trace store")
    try:
        version = json.loads(row[0])
    except (TypeError, ValueError) as err:
        raise _damaged(path, f"its schema_version {row[0]!r} is unreadable") from err
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has trace schema version {version}; this stabilizer reads version "
            f"{SCHEMA_VERSION}. Use the stabilizer version that wrote it"
        )


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error: a step is all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _put_meta(conn: sqlite3.Connection, values: dict) -> None:
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(str(k), _dumps(v)) for k, v in values.items()],
    )


def _delete_steps(conn: sqlite3.Connection, cond: str, step: int, *, events: bool) -> None:
    tables = ["steps", "module_stats", "param_stats"]
    if events:
        tables += ["anomalies", "actions"]
    for table in tables:
        conn.execute(f"DELETE FROM {table} WHERE step {cond}", (step,))


def _fill(steps: np.ndarray, rows: list[tuple], width: int) -> np.ndarray:
    """Scatter (step, id, value) rows into a NaN-filled (len(steps), width) array."""
    out = np.full((len(steps), width), np.nan)
    if not rows:
        return out
    # dtype=float turns NULL (None) into NaN in one C loop.
    arr = np.array(rows, dtype=float)
    step_idx = np.searchsorted(steps, arr[:, 0].astype(np.int64))
    # Rows of steps outside ``steps`` or ids beyond the registered ones are dropped.
    ok = (step_idx < len(steps)) & (arr[:, 1] < width)
    ok[ok] = steps[step_idx[ok]] == arr[ok, 0]
    out[step_idx[ok], arr[ok, 1].astype(np.int64)] = arr[ok, 2]
    return out


def _float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _json_default(obj: Any) -> Any:
    # Evidence often holds numpy scalars/arrays and paths straight from the detector.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON in the trace store")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)
