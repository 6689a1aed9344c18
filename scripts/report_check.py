"""Open real report pages in headless Chromium and fail on anything a reader would hit.

    .venv/bin/python scripts/report_check.py              # make report-check
    .venv/bin/python scripts/report_check.py --self-test  # prove the checker catches errors

It installs Debian's ``chromium`` when ``/usr/bin/chromium`` is missing (as root:
``apt-get update -qq && apt-get install -y -qq chromium``), trains the tiny model with
``--trace`` for a few steps into a temporary folder (a healthy run and the classic fp16
failure), writes their reports with ``stabilizer.reports.write_report``, adds a
hand-written store (hostile labels, no steps, no figures), and opens each page with
``chromium --headless --dump-dom``. A page fails when:

- the dumped DOM lacks ``data-ready="1"`` on ``<body>`` (the page script did not run to
  its end),
- Chromium's stderr holds a console error (an uncaught exception or console.error), or
- an ``<img>`` has no embedded PNG data (``data:image/png;base64,...``) or a figure of
  the report is missing.

``--self-test`` runs the same checks on pages with a deliberate ``throw``, a
``console.error`` and a broken image, and fails unless each is caught.
Exit status: 0 all pages pass, 1 a check failed, 2 the check could not run.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROME_TIMEOUT_S = 90

# Chromium logs a page's console messages to stderr as
#   [pid:tid:MMDD/HHMMSS.micro:LEVEL:CONSOLE:line] "message", source: URL (line)
# (Chromium 156, Debian 12) or, in older builds, with "CONSOLE(line)". The LEVEL is not to
# be trusted: Chromium 156 logs console.error() at INFO, like console.log(), and CSP
# blocks are not logged at all. Uncaught exceptions say "Uncaught ...". So each page is
# also opened as an instrumented copy whose first script re-logs console.error(), failed
# loads and CSP violations with MARKER, and, once the page has loaded, clicks every
# header of the module table (checking the order), types in its filter and ticks its
# checkbox; it logs DONE when it got through.
_CONSOLE = re.compile(r"^\[[^\]]*:(?P<level>[A-Z]+):CONSOLE[:(][^\]]*\]\s*(?P<msg>.*)$")
MARKER = "[report-check]"
DONE = "[report-check:exercised]"
_INSTRUMENT_JS = """
(function () {
  "use strict";
  var log = function (what) { console.log("@MARKER@ " + what); };
  console.error = function () {
    log("console.error: " + Array.prototype.join.call(arguments, " "));
  };
  window.addEventListener("error", function (ev) {
    var t = ev.target;
    if (t && t !== window && (t.src || t.href)) {
      log("failed to load <" + String(t.tagName).toLowerCase() + "> "
          + String(t.src || t.href).slice(0, 60));
    }
  }, true);
  document.addEventListener("securitypolicyviolation", function (ev) {
    log("CSP violation: " + ev.violatedDirective + " " + ev.blockedURI);
  });
  window.addEventListener("load", function () {
    var table = document.getElementById("module-table");
    if (!table) { return; }
    var rows = function () { return Array.prototype.slice.call(table.tBodies[0].rows); };
    var n = rows().length;
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    heads.forEach(function (th, col) {
      [1, -1].forEach(function (dir) {
        th.querySelector("button").click();
        if (rows().length !== n) { log("sorting column " + col + " lost rows"); }
        if (th.dataset.type !== "num") { return; }
        var v = rows().map(function (r) { return r.cells[col].dataset.v; })
          .filter(function (x) { return x !== ""; }).map(parseFloat);
        for (var i = 1; i < v.length; i += 1) {
          if ((v[i] - v[i - 1]) * dir < 0) { log("column " + col + " is not sorted"); break; }
        }
      });
    });
    var filter = document.getElementById("mod-filter");
    var only = document.getElementById("mod-bad");
    filter.value = "no such module, surely";
    filter.dispatchEvent(new Event("input"));
    if (rows().some(function (r) { return !r.hidden; })) { log("the filter hides nothing"); }
    filter.value = "";
    filter.dispatchEvent(new Event("input"));
    if (rows().some(function (r) { return r.hidden; })) { log("an empty filter hides rows"); }
    only.click();
    if (rows().some(function (r) { return !r.hidden && !r.dataset.bad; })) {
      log("the non-finite checkbox shows clean rows");
    }
    only.click();
    console.log("@DONE@ " + n + " rows");
  });
})();
"""
INSTRUMENT = (
    "<script>" + _INSTRUMENT_JS.replace("@MARKER@", MARKER).replace("@DONE@", DONE) + "</script>"
)


class CheckError(Exception):
    """The check itself could not run (exit status 2)."""


@dataclass
class PageResult:
    name: str
    path: Path
    problems: list[str] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    stderr: str = ""


# ---------------------------------------------------------------------- chromium


def ensure_chromium() -> Path:
    """``/usr/bin/chromium``, installing Debian's package first when it is missing."""
    if CHROMIUM.is_file():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        raise CheckError(
            f"{CHROMIUM} is missing and there is no apt-get here: install Chromium "
            "(Debian/Ubuntu package 'chromium') and run again"
        )
    if os.geteuid() != 0:
        raise CheckError(
            f"{CHROMIUM} is missing and installing it needs root: run "
            "'sudo apt-get update && sudo apt-get install -y chromium', then this check again"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
    ):
        print(f"report-check: {CHROMIUM} is missing; running: {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise CheckError(
                f"'{' '.join(cmd)}' failed with exit status {proc.returncode} (no network? "
                f"no Debian package source?):\n{tail}"
            )
        print(f"report-check:   done in {time.perf_counter() - started:.0f} s", flush=True)
    if not CHROMIUM.is_file():
        raise CheckError(f"apt-get installed 'chromium' but {CHROMIUM} is still missing")
    return CHROMIUM


def run_chromium(chromium: Path, page: Path, profile: Path) -> tuple[str, str]:
    """(dumped DOM, stderr) of ``page`` after its scripts ran."""
    cmd = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=3000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROME_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise CheckError(f"chromium did not finish {page} in {CHROME_TIMEOUT_S} s") from err
    if proc.returncode != 0 and not proc.stdout.strip():
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise CheckError(f"chromium failed on {page} (exit {proc.returncode}):\n{tail}")
    return proc.stdout, proc.stderr


# ---------------------------------------------------------------------- checks


class _DomScan(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.body_attrs: dict[str, str | None] | None = None
        self.images: list[dict[str, str | None]] = []
        self.figures: list[str] = []
        self.module_table = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body" and self.body_attrs is None:
            self.body_attrs = dict(attrs)
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "table" and dict(attrs).get("id") == "module-table":
            self.module_table = True
        elif tag == "figure":
            self.figures.append(dict(attrs).get("id") or "")


def console_errors(stderr: str) -> list[str]:
    """Console errors, uncaught exceptions and blocked loads in Chromium's stderr log."""
    found = []
    for line in stderr.splitlines():
        line = line.strip()
        m = _CONSOLE.match(line)
        if m is not None:
            msg = m["msg"]
            bad = m["level"] in ("ERROR", "FATAL") or msg.lstrip('"').startswith(
                ("Uncaught", MARKER, "Refused to")
            )
            if bad:
                found.append(line)
        elif "Uncaught" in line or "ERROR:CONSOLE" in line or MARKER in line:
            found.append(line)  # a log format this parser does not know
    return found


def instrumented_copy(page: Path) -> Path:
    """A copy of ``page`` beside it whose first script reports console.error and failed loads."""
    text = page.read_text(encoding="utf-8")
    m = re.search(r"<head[^>]*>", text, re.IGNORECASE)
    at = m.end() if m else 0
    copy = page.with_name(f".check-{page.name}")
    copy.write_text(text[:at] + INSTRUMENT + text[at:], encoding="utf-8")
    return copy


def check_dom(dom: str, expected_figures: list[str] | None) -> tuple[list[str], int, bool]:
    """Problems of the dumped DOM, the number of images, whether it has a module table."""
    scan = _DomScan()
    scan.feed(dom)
    scan.close()
    problems = []
    if scan.body_attrs is None:
        problems.append("the dumped DOM has no <body> (the page did not load)")
    elif scan.body_attrs.get("data-ready") != "1":
        problems.append('<body> lacks data-ready="1": the page script did not run to its end')
    for i, img in enumerate(scan.images):
        what = f"<img> #{i + 1} ({img.get('data-name') or img.get('alt') or 'no alt'})"
        src = img.get("src") or ""
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix):
            problems.append(f"{what} has no embedded PNG data (src starts {src[:40]!r})")
            continue
        try:
            raw = base64.b64decode(src[len(prefix) :], validate=True)
        except ValueError:
            problems.append(f"{what}: its base64 data does not decode")
            continue
        if not raw.startswith(PNG_MAGIC):
            problems.append(f"{what}: its data is not a PNG")
        if not img.get("alt"):
            problems.append(f"{what} has no alt text")
    if expected_figures is not None:
        names = {img.get("data-name") for img in scan.images}
        missing = [f for f in expected_figures if f not in names]
        if missing:
            problems.append(f"figures missing from the page: {', '.join(missing)}")
    return problems, len(scan.images), scan.module_table


def check_page(
    chromium: Path, name: str, page: Path, profile: Path, figures: list[str] | None
) -> PageResult:
    """Open the page as it is (DOM, images, uncaught errors), then its instrumented copy."""
    result = PageResult(name, page)
    started = time.perf_counter()
    dom, stderr = run_chromium(chromium, page, profile)
    copy = instrumented_copy(page)
    try:
        _, stderr_copy = run_chromium(chromium, copy, profile)
    finally:
        copy.unlink(missing_ok=True)
    result.seconds = time.perf_counter() - started
    result.stderr = stderr + stderr_copy
    result.problems, result.images, has_table = check_dom(dom, figures)
    if has_table and DONE not in stderr_copy:
        result.problems.append("the module table exercise (sort, filter, checkbox) did not finish")
    seen = set()
    for line in console_errors(stderr) + console_errors(stderr_copy):
        msg = line.split("] ", 1)[-1].replace(copy.name, page.name)
        if msg.split(", source: ")[0] not in seen:  # the copy's line numbers differ
            seen.add(msg.split(", source: ")[0])
            result.problems.append(f"console: {msg}")
    return result


# ---------------------------------------------------------------------- pages


def build_pages(work: Path) -> list[tuple[str, Path, list[str] | None]]:
    """Real reports of short traced runs, plus a hand-made hostile store."""
    sys.path.insert(0, str(REPO))
    from rich.console import Console

    from stabilizer.config import TrainConfig
    from stabilizer.detector.policy import NumericalAnomalyError
    from stabilizer.train import train

    common = dict(max_steps=4, max_train_samples=32, save_every=None, trace=True)
    console = Console(file=io.StringIO(), width=120)  # the runs' own output is not shown
    pages = []
    started = time.perf_counter()
    healthy = work / "healthy"
    print(f"report-check: training the tiny model for 4 traced steps into {healthy}", flush=True)
    train(TrainConfig.smoke(healthy, **common), console=console)
    pages.append(("healthy run", *_report(healthy)))
    classic = work / "classic"
    print(f"report-check: the classic fp16 failure (stops at step 0) into {classic}", flush=True)
    try:
        train(TrainConfig.smoke(classic, adapter_dtype="fp16", **common), console=console)
    except NumericalAnomalyError:
        pass
    else:
        raise CheckError("the classic fp16 run did not stop on an anomaly: cannot check its page")
    pages.append(("classic fp16 failure", *_report(classic)))
    ranks = work / "two-ranks"
    print(f"report-check: 2 ranks under torchrun, NaN on rank 1 at step 2, into {ranks}")
    _two_rank_run(ranks)
    pages.append(("torchrun, 2 ranks, NaN on rank 1", *_report(ranks)))
    hostile = work / "hostile"
    _hostile_store(hostile)
    pages.append(("hand-made store, no steps", *_report(hostile)))
    print(f"report-check: built {len(pages)} pages in {time.perf_counter() - started:.0f} s")
    return pages


def _two_rank_run(run_dir: Path) -> None:
    """A real 2-rank gloo run (tests/ddp_worker.py) whose rank 1 makes a NaN; skipped."""
    import os
    import subprocess

    module = "base_model.model.qformer.encoder.layer.1.intermediate_query.dense"
    env = {**os.environ, "STABILIZER_TEST_FAULT": f"1:2:{module}", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tests" / "ddp_worker.py"), "train", "--run-dir", str(run_dir),
        "--max-steps", "4", "--batch-size", "4", "--max-train-samples", "32",
        "--max-eval-samples", "8", "--real-images-only", "--device", "cpu", "--trace",
        "--on-anomaly", "skip", "--no-replay",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise CheckError(f"the 2-rank run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def _report(run_dir: Path) -> tuple[Path, list[str] | None]:
    """Write the run's report; return the page and the figure names it must show."""
    from stabilizer.reports import FIGURES_DIR, REPORT_FILE, write_report

    try:
        import stabilizer.reports.plots  # noqa: F401
    except ImportError:
        # Until plots exist, check the page alone: no figures, but every other check.
        from stabilizer.reports.html import render_html
        from stabilizer.store import TraceStore

        print("report-check: WARNING stabilizer.reports.plots is missing: pages have no plots")
        with TraceStore.open(run_dir / "trace.db") as store:
            page = run_dir / REPORT_FILE
            page.write_text(render_html(store, run_dir, []), encoding="utf-8")
        return page, []
    page = write_report(run_dir)
    names = sorted(p.stem for p in (run_dir / FIGURES_DIR).glob("*.png"))
    return page, names


def _hostile_store(run_dir: Path) -> None:
    from stabilizer.store import ModuleInfo, ParamInfo, TraceStore

    evil = '<script>throw new Error("escaped?")</script><img src=x onerror=alert(1)>'
    with TraceStore.create(
        run_dir / "trace.db", meta={"config": {"model": evil, "lora": {"targets": evil}}}
    ) as store:
        store.register_modules(
            [ModuleInfo(0, f"m.{evil}", evil, "lora", 0, "qformer", True)]
            + [ModuleInfo(i, f"m.{i}", f"module {i}", "ffn", i, "qformer", False) for i in (1, 2)]
        )
        store.register_params([ParamInfo(0, "p.0", evil, 0, 16, "float32")])
        store.append_anomaly(
            step=0,
            pass_="forward",
            module_id=0,
            op=evil,
            cause=evil,
            summary=evil,
            fix=evil,
            evidence={"module": evil, "module_path": evil, "nested": {"x": evil}},
        )


def _tiny_png() -> bytes:
    """A valid 1x1 white PNG (a broken one fails to decode and is reported)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\xff\xff")
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def self_test_pages(work: Path) -> list[tuple[str, Path, str]]:
    """Pages the checker must reject, with the words its report must contain."""
    ok_png = base64.b64encode(_tiny_png()).decode()
    ready = '<script>document.body.dataset.ready = "1";</script>'
    cases = {
        "throw": (
            '<script>function f() { throw new Error("deliberate"); } f();</script>' + ready,
            "Uncaught Error: deliberate",
        ),
        "throw-before-ready": (
            '<script>throw new Error("deliberate"); document.body.dataset.ready = "1";</script>',
            "data-ready",
        ),
        "console-error": (
            '<script>console.error("deliberate");</script>' + ready,
            "console.error: deliberate",
        ),
        "csp-blocked": (
            # The report's own CSP blocks anything external; the block must be caught.
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; "
            "script-src 'unsafe-inline'\"><link rel=stylesheet href=\"https://example.invalid/"
            'x.css">' + ready,
            "CSP violation",
        ),
        "broken-img": (f'<img src="" alt="x">{ready}', "no embedded PNG data"),
        "not-png": (f'<img src="data:image/png;base64,AAAA" alt="x">{ready}', "not a PNG"),
        "broken-sort": (
            # A module table whose headers do nothing: the exercise must notice.
            '<input id="mod-filter"><input id="mod-bad" type="checkbox">'
            '<table id="module-table"><thead><tr><th data-type="num"><button>v</button></th>'
            '</tr></thead><tbody><tr><td data-v="2">2</td></tr><tr data-bad="1">'
            '<td data-v="1">1</td></tr></tbody></table>' + ready,
            "not sorted",
        ),
        "clean": (f'<img src="data:image/png;base64,{ok_png}" alt="x">{ready}', ""),
    }
    pages = []
    for name, (body, expect) in cases.items():
        page = work / f"{name}.html"
        page.write_text(
            # <meta> and <link> before <body> so that the parser puts them in <head>.
            f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{name}</title>"
            + (body.split("<script>", 1)[0] if name == "csp-blocked" else "")
            + "</head><body>"
            + (body[body.index("<script>") :] if name == "csp-blocked" else body)
            + "</body></html>",
            encoding="utf-8",
        )
        pages.append((name, page, expect))
    return pages


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="check pages with a deliberate throw, console.error and broken images instead",
    )
    parser.add_argument("--keep", type=Path, help="build the pages here and keep them")
    parser.add_argument("--show-log", action="store_true", help="print Chromium's stderr")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        chromium = ensure_chromium()
        with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
            work = args.keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            profile = Path(tmp) / "chromium-profile"
            if args.self_test:
                failed = _self_test(chromium, work, profile, show_log=args.show_log)
            else:
                failed = _check(chromium, work, profile, show_log=args.show_log)
    except CheckError as err:
        print(f"report-check: cannot run: {err}", file=sys.stderr)
        return 2
    took = time.perf_counter() - started
    if failed:
        print(f"report-check: FAILED ({failed} page(s)) in {took:.0f} s", file=sys.stderr)
        return 1
    print(f"report-check: all pages passed in {took:.0f} s")
    return 0


def _check(chromium: Path, work: Path, profile: Path, *, show_log: bool) -> int:
    failed = 0
    for name, page, figures in build_pages(work):
        result = check_page(chromium, name, page, profile, figures)
        if show_log:
            print(result.stderr)
        if result.problems:
            failed += 1
            print(f"FAIL {name}: {page}", file=sys.stderr)
            for problem in result.problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            kb = page.stat().st_size / 1024
            print(
                f"ok   {name}: {page.name} ({kb:.0f} KiB, {result.images} images, script ran, "
                f"no console errors; {result.seconds:.1f} s in chromium)"
            )
    return failed


def _self_test(chromium: Path, work: Path, profile: Path, *, show_log: bool) -> int:
    failed = 0
    for name, page, expect in self_test_pages(work):
        result = check_page(chromium, name, page, profile, None)
        if show_log:
            print(result.stderr)
        text = "; ".join(result.problems)
        caught = bool(result.problems) and expect.lower() in text.lower()
        if not expect:
            caught = not result.problems
        status = "ok  " if caught else "FAIL"
        want = f"must be rejected ({expect})" if expect else "must pass"
        print(f"{status} self-test {name}: {want}; checker said: {text or 'no problems'}")
        failed += not caught
    return failed


if __name__ == "__main__":
    sys.exit(main())
