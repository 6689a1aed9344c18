"""The report page: one self-contained HTML5 file built from the trace store alone.

``render_html(store, run_dir, figures)`` returns the page as a string (``write_report``
writes it to ``run_dir/report.html``). The page opens from disk with no network: PNGs
are embedded as base64 data URIs, CSS and the few lines of JavaScript are inline, and a
Content-Security-Policy forbids loading anything else. Every string that reaches the page
(labels, module paths, causes, evidence, config values) goes through ``html.escape``.

Sections, top to bottom: summary, diagnosis cards (anomalies, then early warnings) with
the policy actions, the figures, the module table (sortable, filterable), footer.
The script ends with ``document.body.dataset.ready = "1"``: a headless browser check
(``scripts/report_check.py``) reads it to tell that the script ran to the end.

No torch here: a report can be made on a machine that only has the run folder.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from stabilizer.detector.diagnosis import anomaly_kind
from stabilizer.probes.schema import SITES
from stabilizer.reports import Figure
from stabilizer.store import TraceStore

EVAL_FILE = "eval.json"  # stabilizer.rundir.EVAL_FILE (rundir imports config -> lora)
REPRO_DIR = "repro"
DASH = "\u2013"  # shown for NaN / missing values
MAX_LIST = 6  # evidence lists longer than this are shortened
MAX_TEXT = 600  # evidence strings longer than this are cut
STOP_ACTIONS = ("raise", "stop")
EVAL_MODES = ("real", "blank", "shuffled")


def render_html(
    store: TraceStore,
    run_dir: Path,
    figures: list[Figure],
    ranks: list[tuple[int, TraceStore]] | None = None,
) -> str:
    """The whole report page for the run in ``run_dir`` whose trace is ``store``.

    ``ranks`` (every rank's store, rank 0 first) adds a ranks section, every rank's
    anomaly cards and a "non-finite on ranks" column; ``store`` is rank 0's.
    """
    run_dir = Path(run_dir)
    data = _collect(store, run_dir)
    if ranks is not None and len(ranks) > 1:
        _merge_ranks(data, ranks)
    body = "\n".join(
        [
            _summary(data),
            _ranks_section(data),
            _diagnosis(data),
            _figures(figures),
            _module_table(data),
            _footer(store),
        ]
    )
    title = f"stabilizer report: {data['name']}"
    # Concatenation, not str.format: the CSS and script are full of braces.
    return (
        _HEAD.replace("@TITLE@", e(title))
        + f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n<script>{_SCRIPT}</script>\n"
        + "</body>\n</html>\n"
    )


# ---------------------------------------------------------------------- gathering


def _collect(store: TraceStore, run_dir: Path) -> dict[str, Any]:
    meta = store.meta()
    cfg = meta.get("config") or {}
    if not isinstance(cfg, dict):
        cfg = {}
    eval_path = run_dir / EVAL_FILE
    evaluation: dict | None = None
    if eval_path.is_file():
        try:
            evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            evaluation = {"unreadable": True}
    anomalies = store.anomalies()
    actions = store.actions()
    if evaluation is not None:
        status = "completed"
    elif any(a["action"] in STOP_ACTIONS for a in actions):
        status = "stopped on an anomaly"
    elif meta.get("completed"):  # runs outside our loop (a Trainer) have no eval.json
        status = "completed"
    else:
        status = "partial (killed or still running)"
    # A run traced outside our loop names itself (a Trainer's folder is "stabilizer").
    name = meta.get("run_name") or run_dir.name or run_dir.resolve().name
    name = str(name)
    return {
        "name": name,
        "run_dir": run_dir,
        "status": status,
        "cfg": cfg,
        "eval": evaluation,
        "modules": store.modules(),
        "params": store.params(),
        "steps": store.steps(),
        "anomalies": anomalies,
        "actions": actions,
        "stats": _module_stats(store),
    }


def _merge_ranks(data: dict[str, Any], ranks: list[tuple[int, TraceStore]]) -> None:
    from stabilizer.reports.ranks import nonfinite_ranks_by_module, rank_overview

    data["ranks"] = rank_overview(ranks)
    data["module_ranks"] = nonfinite_ranks_by_module(ranks, len(data["modules"]))
    merged = []
    for rank, store in ranks:
        for anomaly in store.anomalies() if rank else data["anomalies"]:
            merged.append({**anomaly, "rank": rank})
    # Actions are the same on every rank (the verdict is agreed): rank 0's say it.
    # Per step, the rank where the value was born first, then the ranks it reached.
    data["anomalies"] = sorted(
        merged,
        key=lambda a: (a.get("step") or 0, a.get("cause") == "other-rank", a["rank"]),
    )


def _ranks_section(d: dict[str, Any]) -> str:
    ranks = d.get("ranks")
    if not ranks:
        return ""
    rows = []
    for rank, r in sorted(ranks.items()):
        first = r["first"]
        if first is None:
            first_cell = DASH
        else:
            where = f", {r['first_module']}" if r["first_module"] else ""
            first_cell = e(
                f"step {_text(first.get('step'))}, {_text(first.get('pass'))} pass{where}: "
                f"{_text(first.get('cause'))}"
            )
        origin = "born here" if r["origin"] else ("received" if first is not None else DASH)
        bad = ' class="bad"' if r["origin"] else ""
        rows.append(
            f"<tr{bad}><td>{rank}</td><td><code>{e(r['store'])}</code></td>"
            f"<td>{r['steps']}</td><td>{r['nonfinite_loss']}</td><td>{r['not_ok']}</td>"
            f"<td>{r['anomalies']}</td><td>{first_cell}</td><td>{e(origin)}</td></tr>"
        )
    return (
        '<section id="ranks">\n<h2>Ranks</h2>\n'
        f"<p>{len(ranks)} ranks (torchrun), one trace store each. Every rank takes the same "
        "action in the same step; the rank where a NaN/Inf was born keeps its own diagnosis, "
        "the others record that it reached them through the gradient all-reduce.</p>\n"
        '<table class="grid" id="rank-table"><thead><tr><th>rank</th><th>store</th>'
        "<th>steps</th><th>non-finite losses</th><th>steps not ok</th><th>anomalies</th>"
        "<th>first anomaly</th><th>NaN/Inf</th></tr></thead>\n"
        f"<tbody>\n{chr(10).join(rows)}\n</tbody></table>\n</section>"
    )


def _module_stats(store: TraceStore) -> dict[str, Any]:
    """Per-module columns of the module table (arrays of length n_modules)."""
    n = len(store.modules())
    steps, fwd_absmax = store.module_stat("absmax", "fwd_out")
    _, fwd_rms = store.module_stat("rms", "fwd_out")
    _, grad_rms = store.module_stat("rms", "grad_out")
    _, scores = store.module_stat("absmax", "score_max")
    nonfinite = np.zeros((len(steps), n), dtype=bool)
    for site in SITES:
        for stat in ("nan", "inf"):
            _, count = store.module_stat(stat, site)
            nonfinite |= np.nan_to_num(count, nan=0.0) > 0
    nan_row = np.full(n, np.nan)
    return {
        "full_steps": steps,
        "last_step": int(steps[-1]) if len(steps) else None,
        "last_absmax": fwd_absmax[-1] if len(steps) else nan_row,
        "last_rms": fwd_rms[-1] if len(steps) else nan_row,
        "last_grad_rms": grad_rms[-1] if len(steps) else nan_row,
        "max_absmax": _nanmax(fwd_absmax, n),
        "score_max": _nanmax(scores, n),
        "nonfinite_steps": nonfinite.sum(axis=0),
    }


def _nanmax(values: np.ndarray, n: int) -> np.ndarray:
    """Column max ignoring NaN; NaN where a column has no value at all."""
    if values.size == 0:
        return np.full(n, np.nan)
    filled = np.where(np.isnan(values), -np.inf, values)
    out = filled.max(axis=0)
    out[np.isnan(values).all(axis=0)] = np.nan
    return out


# ---------------------------------------------------------------------- sections


def _summary(d: dict[str, Any]) -> str:
    cfg, steps = d["cfg"], d["steps"]
    lora = cfg.get("lora") if isinstance(cfg.get("lora"), dict) else {}
    status_class = {"completed": "ok", "stopped on an anomaly": "bad"}.get(d["status"], "warn")
    rows: list[tuple[str, str]] = [
        ("run folder", f"<code>{e(d['name'])}</code>"),
        ("status", f'<span class="status {status_class}" id="run-status">{e(d["status"])}</span>'),
        ("model", e(_text(cfg.get("model")))),
        ("dataset", e(_text(cfg.get("dataset")))),
        ("precision", e(_text(cfg.get("precision")))),
        ("adapter dtype", e(_text(cfg.get("adapter_dtype")))),
        (
            "LoRA",
            e(f"targets {_text(lora.get('targets'))}, rank {_text(lora.get('rank'))}")
            + (e(f", alpha {_text(lora['alpha'])}") if "alpha" in lora else ""),
        ),
        ("trainable parameters", e(_params_line(d["params"]))),
        ("steps recorded", e(_steps_line(steps))),
        ("anomalies / early warnings", e(_event_counts(d["anomalies"]))),
        ("skipped / rolled-back steps", e(_skip_counts(steps))),
    ]
    for key, label in (("lr", "learning rate"), ("on_anomaly", "on anomaly")):
        if key in cfg:
            rows.append((label, e(_text(cfg[key]))))
    if d["eval"] is not None:
        rows.append(("final evaluation", _eval_line(d["eval"])))
    cells = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        '<section id="summary">\n'
        f"<h1>stabilizer report: {e(d['name'])}</h1>\n"
        f'<table class="kv">\n{cells}\n</table>\n</section>'
    )


def _params_line(params: list) -> str:
    if not params:
        return "none recorded"
    total = sum(int(p.numel or 0) for p in params)
    dtypes = Counter(str(p.dtype) for p in params)
    kinds = ", ".join(f"{k} ({v} tensors)" for k, v in sorted(dtypes.items()))
    return f"{total:,} in {len(params)} tensors; dtypes: {kinds}"


def _steps_line(steps: dict[str, np.ndarray]) -> str:
    n = len(steps["step"])
    if n == 0:
        return "none"
    first, last = int(steps["step"][0]), int(steps["step"][-1])
    full = int(steps["full"].sum())
    line = f"{first}..{last} ({n} steps, {full} with full statistics)"
    loss = steps["loss"]
    finite = np.flatnonzero(np.isfinite(loss))
    if len(finite):
        line += f"; last finite loss {_num(loss[finite[-1]])} at step {steps['step'][finite[-1]]}"
    return line


def _event_counts(anomalies: list[dict]) -> str:
    warnings = sum(1 for a in anomalies if _is_warning(a))
    return f"{_plural(len(anomalies) - warnings, 'anomaly', 'anomalies')}, " + _plural(
        warnings, "early warning", "early warnings"
    )


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _skip_counts(steps: dict[str, np.ndarray]) -> str:
    status = Counter(str(s) for s in steps["status"])
    parts = [f"{status.get('skipped', 0)} skipped", f"{status.get('rolled_back', 0)} rolled back"]
    if status.get("repaired"):
        parts.append(f"{status['repaired']} repaired")
    if status.get("anomaly"):
        parts.append(f"{status['anomaly']} kept despite NaN/Inf")
    if status.get("stopped"):
        parts.append(f"{status['stopped']} stopped the run")
    return ", ".join(parts)


def _eval_line(evaluation: dict) -> str:
    results = evaluation.get("results")
    if not isinstance(results, dict):
        return "eval.json present but unreadable" if evaluation.get("unreadable") else DASH
    parts = []
    for mode in EVAL_MODES:
        res = results.get(mode)
        if isinstance(res, dict) and "accuracy" in res:
            parts.append(f"{mode} images {_acc(res['accuracy'])}")
    baseline = evaluation.get("majority_baseline")
    if isinstance(baseline, dict) and "all" in baseline:
        parts.append(f"majority answer {_acc(baseline['all'])}")
    step = evaluation.get("step")
    where = f" (step {_text(step)})" if step is not None else ""
    return e("accuracy: " + (", ".join(parts) if parts else DASH) + where)


def _diagnosis(d: dict[str, Any]) -> str:
    anomalies, actions = d["anomalies"], d["actions"]
    labels = {m.id: m.label for m in d["modules"]}
    errors = [a for a in anomalies if not _is_warning(a)]
    warnings = [a for a in anomalies if _is_warning(a)]
    parts = ['<section id="diagnosis">', "<h2>Diagnosis</h2>"]
    if not anomalies:
        parts.append('<p class="ok">No NaN/Inf anomaly and no early warning was recorded.</p>')
    for a in errors:
        parts.append(_card(a, labels, d["run_dir"]))
    if warnings:
        parts.append(
            f'<details class="warnings"><summary>'
            f"{_plural(len(warnings), 'early warning', 'early warnings')} "
            "(nothing non-finite yet)</summary>"
        )
        parts.extend(_card(a, labels, d["run_dir"]) for a in warnings)
        parts.append("</details>")
    repairs = [a for a in actions if a.get("action") == "repair"]
    if repairs:
        # --on-anomaly repair: what was changed, at which step (the step was redone).
        parts.append(f"<h3>Repairs ({len(repairs)})</h3>")
        parts.append(_actions_table(repairs))
    parts.append(_preflight(d["run_dir"]))
    if actions:
        parts.append("<h3>Actions</h3>")
        parts.append(_actions_table(actions))
    parts.append("</section>")
    return "\n".join(parts)


def _preflight(run_dir: Path) -> str:
    """The preflight's errors and warnings from ``preflight.json`` (none: nothing)."""
    try:
        saved = json.loads((Path(run_dir) / "preflight.json").read_text(encoding="utf-8"))
        findings = [f for f in saved.get("findings", []) if f.get("level") != "ok"]
    except (OSError, ValueError, AttributeError, TypeError):
        return ""
    if not findings:
        return ""
    rows = "".join(
        f"<tr><td>{e(_text(f.get('level')))}</td><td>{e(_text(f.get('check')))}</td>"
        f"<td>{e(_text(f.get('message')))}</td><td>{e(_text(f.get('fix')))}</td></tr>"
        for f in findings
        if isinstance(f, dict)
    )
    return (
        "<h3>Preflight (before step 0)</h3>"
        '<table class="grid actions"><thead><tr><th>level</th><th>check</th>'
        f"<th>finding</th><th>fix</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _card(a: dict, labels: dict[int, str], run_dir: Path) -> str:
    ev = a.get("evidence") if isinstance(a.get("evidence"), dict) else {}
    warning = _is_warning(a)
    label = _module_label(a, labels)
    path = ev.get("module_path")
    kind = "warning" if warning else anomaly_kind(a.get("cause"))
    where = f" in {label}" if label else ""
    op = f" (op {a['op']})" if a.get("op") else ""
    headline = f"{kind} at step {_text(a.get('step'))}, {_text(a.get('pass'))} pass{where}{op}"
    if "rank" in a:
        headline = f"rank {_text(a['rank'])}: {headline}"
    rows = [
        ("pass", e(_text(a.get("pass")))),
        ("step", e(_text(a.get("step")))),
    ]
    if label or path:
        offender = e(label) if label else ""
        if path:
            offender += f" <code>{e(_text(path))}</code>"
        rows.append(("first offender", offender))
    rows.append(("exact op", f"<code>{e(_text(a['op']))}</code>" if a.get("op") else DASH))
    rows.append(("cause", f"<code>{e(_text(a.get('cause')))}</code> {e(_text(a.get('summary')))}"))
    head = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    evidence = [(k, v) for k, v in _flatten(ev) if k not in ("module", "module_path", "warning")]
    ev_html = ""
    if evidence:
        ev_rows = "\n".join(
            f"<tr><th>{e(k)}</th><td>{e(_evidence_value(v))}</td></tr>" for k, v in evidence
        )
        ev_html = f'<table class="kv evidence"><caption>evidence</caption>\n{ev_rows}\n</table>'
    repro = ""
    step = a.get("step")
    if isinstance(step, int) and step >= 0:
        bundle = Path(REPRO_DIR) / f"step-{step:08d}"
        if (run_dir / bundle).is_dir():
            href = bundle.as_posix() + "/"
            repro = (
                f'<p class="repro">Repro bundle: <a href="{e(href)}">{e(href)}</a> '
                f"(<code>stabilizer replay {e(str(run_dir / bundle))}</code>)</p>"
            )
    css = "card warning" if warning else "card anomaly"
    return (
        f'<article class="{css}" data-step="{e(_text(step))}">\n'
        f"<h3>{e(headline)}</h3>\n"
        f'<table class="kv">\n{head}\n</table>\n{ev_html}\n'
        f'<p class="fix"><strong>Fix:</strong> {e(_text(a.get("fix")))}</p>\n{repro}\n'
        "</article>"
    )


def _actions_table(actions: list[dict]) -> str:
    rows = "\n".join(
        f"<tr><td>{e(_text(a.get('step')))}</td><td>{e(_text(a.get('action')))}</td>"
        f"<td>{e(_text(a.get('detail')))}</td><td>{e(_clock(a.get('created')))}</td></tr>"
        for a in actions
    )
    return (
        '<table class="grid actions"><thead><tr><th>step</th><th>action</th><th>detail</th>'
        f"<th>time</th></tr></thead>\n<tbody>\n{rows}\n</tbody></table>"
    )


def _figures(figures: list[Figure]) -> str:
    parts = ['<section id="figures">', "<h2>Plots</h2>"]
    if not figures:
        parts.append("<p>No plots were made for this run.</p>")
    for fig in figures:
        missing = f"the image {fig.path} is empty"
        try:
            data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
        except OSError as err:
            data = ""
            missing = f"the image {fig.path} could not be read ({err.strerror or err})"
        anchor = e(f"fig-{fig.name}")
        if data:
            img = (
                f'<img src="data:image/png;base64,{data}" alt="{e(fig.title)}" '
                f'data-name="{e(fig.name)}" loading="lazy">'
            )
        else:
            img = f'<p class="missing">{e(missing)}</p>'
        parts.append(
            f'<figure id="{anchor}">\n<h3>{e(fig.title)}</h3>\n{img}\n'
            f"<figcaption>{e(fig.caption)}</figcaption>\n</figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


_COLUMNS = (
    # header, type (for sorting), tooltip
    ("label", "text", "human label of the module"),
    ("kind", "text", "module kind"),
    ("layer", "num", "Q-Former layer"),
    ("raw path", "text", "module name in the model"),
    ("fwd_out abs-max", "num", "largest finite |output| at the last full-statistics step"),
    ("fwd_out RMS", "num", "RMS of the output at the last full-statistics step"),
    ("grad_out RMS", "num", "RMS of the output gradient at the last full-statistics step"),
    ("max abs-max", "num", "largest finite |output| over all full-statistics steps"),
    ("score max", "num", "largest |q·k| (before the 1/sqrt(d) scale) over the run"),
    ("non-finite steps", "num", "full-statistics steps with NaN/Inf in any site"),
    ("flagged", "text", "first offender of an anomaly (or subject of a warning)"),
)
_RANK_COLUMN = (("non-finite on ranks", "text", "ranks where any of its tensors was NaN/Inf"),)


def _module_table(d: dict[str, Any]) -> str:
    modules, stats = d["modules"], d["stats"]
    module_ranks = d.get("module_ranks")
    flags = _flags([a for a in d["anomalies"] if not a.get("rank")])
    rows = []
    for i in _order(modules):
        m = modules[i]
        nf = int(stats["nonfinite_steps"][i])
        flag = flags.get(m.id, "")
        bad = nf > 0 or flag.startswith("anomaly")
        cells = [
            _text_cell(m.label),
            _text_cell(m.kind),
            _num_cell(m.layer),
            f"<td><code>{e(_text(m.name))}</code></td>",
            _num_cell(stats["last_absmax"][i]),
            _num_cell(stats["last_rms"][i]),
            _num_cell(stats["last_grad_rms"][i]),
            _num_cell(stats["max_absmax"][i]),
            _num_cell(stats["score_max"][i]),
            _num_cell(nf),
            _text_cell(flag),
        ]
        if module_ranks is not None:
            cells.append(_text_cell(", ".join(str(r) for r in module_ranks[i])))
        attrs = ' class="bad" data-bad="1"' if bad else ""
        rows.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    heads = "".join(
        f'<th data-type="{kind}" title="{e(tip)}" aria-sort="none">'
        f'<button type="button">{e(name)}</button></th>'
        for name, kind, tip in _COLUMNS + (_RANK_COLUMN if module_ranks is not None else ())
    )
    last = stats["last_step"]
    note = (
        f"Per-module values at the last full-statistics step ({last}); maxima and counts over "
        f"all {len(stats['full_steps'])} full-statistics steps."
        if last is not None
        else "No step recorded full statistics: only labels and flags are shown."
    )
    return (
        '<section id="modules">\n<h2>Modules</h2>\n'
        f"<p>{e(note)} Click a header to sort; NaN or no value is shown as {DASH}.</p>\n"
        '<div class="controls"><label>filter <input id="mod-filter" type="search" '
        'placeholder="label, kind or path" autocomplete="off"></label> '
        '<label><input id="mod-bad" type="checkbox"> only modules with non-finite values '
        "(or flagged)</label> "
        f'<span id="mod-count">{len(rows)} of {len(rows)} modules</span></div>\n'
        f'<table class="grid" id="module-table"><thead><tr>{heads}</tr></thead>\n'
        f"<tbody>\n{chr(10).join(rows)}\n</tbody></table>\n</section>"
    )


def _flags(anomalies: list[dict]) -> dict[int, str]:
    """module id -> "anomaly at step N" (first one) or "warning at step N"."""
    flags: dict[int, str] = {}
    for a in sorted(anomalies, key=_is_warning):  # anomalies before warnings
        mid = a.get("module_id")
        if not isinstance(mid, int) or mid in flags:
            continue
        kind = "warning" if _is_warning(a) else "anomaly"
        flags[mid] = f"{kind} at step {_text(a.get('step'))} ({_text(a.get('pass'))})"
    return flags


def _order(modules: list) -> list[int]:
    """Row order: the plots' module order when available, else by layer, then id."""
    try:
        from stabilizer.reports.plots import module_order

        order = [int(i) for i in module_order(modules)]
        if sorted(order) == list(range(len(modules))):
            return order
    except Exception:  # noqa: BLE001 - any failure falls back to a plain order
        pass
    return sorted(
        range(len(modules)),
        key=lambda i: (modules[i].layer is not None, modules[i].layer or 0, modules[i].id),
    )


def _footer(store: TraceStore) -> str:
    from stabilizer import __version__

    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return (
        f"<footer>Generated by stabilizer {e(__version__)} at {e(when)} from "
        f"<code>{e(str(store.path))}</code>.</footer>"
    )


# ---------------------------------------------------------------------- formatting


def e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _text(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _num(value: Any) -> str:
    """3 significant digits, compact exponent; NaN/None as a dash."""
    if value is None:
        return DASH
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return DASH
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    text = f"{x:.3g}"
    if "e" in text:
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    return text


def _acc(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return DASH


def _clock(value: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.localtime(float(value)))
    except (TypeError, ValueError, OverflowError, OSError):
        return DASH


def _text_cell(value: Any) -> str:
    return f"<td>{e(_text(value) if value not in (None, '') else '')}</td>"


def _num_cell(value: Any) -> str:
    """A numeric cell: shown compactly, sorted on ``data-v`` (empty for NaN/None)."""
    try:
        x = float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        x = math.nan
    raw = "" if math.isnan(x) else ("Infinity" if x == math.inf else repr(x))
    if x == -math.inf:
        raw = "-Infinity"
    return f'<td class="n" data-v="{e(raw)}">{e(_num(x))}</td>'


def _flatten(evidence: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in evidence.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _evidence_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else _num(value)
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_evidence_value(v) for v in value[:MAX_LIST])
        if len(value) > MAX_LIST:
            shown += f", ... ({len(value)} in all)"
        return shown
    if isinstance(value, dict):
        return "{}" if not value else json.dumps(value, default=str)[:MAX_TEXT]
    text = DASH if value is None else str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + " ..."


def _is_warning(anomaly: dict) -> bool:
    ev = anomaly.get("evidence")
    return bool(isinstance(ev, dict) and ev.get("warning"))


def _module_label(anomaly: dict, labels: dict[int, str]) -> str:
    ev = anomaly.get("evidence") if isinstance(anomaly.get("evidence"), dict) else {}
    if ev.get("module"):
        return str(ev["module"])
    mid = anomaly.get("module_id")
    return labels.get(mid, "") if isinstance(mid, int) else ""


# ---------------------------------------------------------------------- page

_CSS = """
:root { color-scheme: light dark; --bad: #c62828; --warn: #b26a00; --ok: #2e7d32;
  --line: #8884; --fixbg: #fff3c4; --fixfg: #3e2f00; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
  max-width: 1400px; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid var(--line); padding-bottom: .2em; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
table { border-collapse: collapse; }
.kv th { text-align: left; vertical-align: top; padding: 2px 1em 2px 0; white-space: nowrap; }
.kv td { padding: 2px 0; }
.evidence { margin: .5em 0; font-size: 13px; } .evidence caption { text-align: left;
  font-weight: 600; }
.status { font-weight: 700; } .ok { color: var(--ok); } .bad { color: var(--bad); }
.warn { color: var(--warn); }
.card { border: 1px solid var(--line); border-left: 6px solid var(--bad); border-radius: 4px;
  padding: .2em 1em .6em; margin: 1em 0; }
.card.warning { border-left-color: var(--warn); }
.card h3 { margin: .5em 0; }
.fix { background: var(--fixbg); color: var(--fixfg); padding: .5em .8em; border-radius: 4px; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto;
  border: 1px solid var(--line); background: #fff; }
figcaption { color: #777; max-width: 60em; }
.grid { font-size: 12.5px; width: 100%; }
.grid th, .grid td { border-bottom: 1px solid var(--line); padding: 2px 6px; text-align: left; }
.grid td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.grid thead th { position: sticky; top: 0; background: Canvas; }
.grid th button { font: inherit; font-weight: 600; border: 0; background: none; color: inherit;
  cursor: pointer; padding: 0; text-align: left; }
th[aria-sort=ascending] button::after { content: " \\25B2"; }
th[aria-sort=descending] button::after { content: " \\25BC"; }
#module-table tr.bad td { color: var(--bad); }
.controls { margin: .5em 0; display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; }
footer { margin-top: 3em; color: #777; font-size: 12px; }
"""

# Sorting: rows are re-appended in order (one reflow); filtering toggles row.hidden.
_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("module-table");
  var filter = document.getElementById("mod-filter");
  var onlyBad = document.getElementById("mod-bad");
  var count = document.getElementById("mod-count");
  if (table && filter && onlyBad && count) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var text = rows.map(function (r) { return r.textContent.toLowerCase(); });
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var apply = function () {
      var q = filter.value.trim().toLowerCase();
      var shown = 0;
      rows.forEach(function (r, i) {
        var hide = (q && text[i].indexOf(q) < 0) || (onlyBad.checked && !r.dataset.bad);
        r.hidden = !!hide;
        if (!hide) { shown += 1; }
      });
      count.textContent = shown + " of " + rows.length + " modules";
    };
    var key = function (cell, numeric) {
      if (!numeric) { return cell.textContent.toLowerCase(); }
      var v = cell.dataset.v;
      return v === "" || v === undefined ? null : parseFloat(v);
    };
    heads.forEach(function (th, col) {
      th.querySelector("button").addEventListener("click", function () {
        var numeric = th.dataset.type === "num";
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var keyed = rows.map(function (r, i) {
          return { k: key(r.cells[col], numeric), i: i, r: r };
        });
        keyed.sort(function (a, b) {
          if (a.k === b.k) { return a.i - b.i; }
          if (a.k === null) { return 1; }  /* missing values last, either way */
          if (b.k === null) { return -1; }
          return (a.k < b.k ? -1 : 1) * dir;
        });
        var frag = document.createDocumentFragment();
        keyed.forEach(function (x) { frag.appendChild(x.r); });
        body.appendChild(frag);
      });
    });
    filter.addEventListener("input", apply);
    onlyBad.addEventListener("change", apply);
    apply();
  }
  document.body.dataset.ready = "1";
})();
"""

_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="generator" content="stabilizer">
<title>@TITLE@</title>
"""
