"""The HTML report page: content, escaping and self-containment, on real and hand-made stores.

Parsed with the standard library's HTMLParser (no browser here; the headless-browser
check is ``scripts/report_check.py``, ``make report-check``).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from stabilizer.config import TrainConfig
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.probes.schema import SITES, TENSOR_STATS
from stabilizer.reports import Figure
from stabilizer.reports.html import render_html
from stabilizer.store import ModuleInfo, ParamInfo, StepData, TraceStore
from stabilizer.train import train

REPO = Path(__file__).resolve().parents[1]
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'
VOID = {"meta", "link", "img", "input", "br", "hr", "col", "source", "wbr", "area", "base"}


# ---------------------------------------------------------------------- parsing


class Page(HTMLParser):
    """Well-formedness check plus what the tests look at."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.module_rows = 0
        self._in_modules = False
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed tags: {self.stack}")

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table" and a.get("id") == "module-table":
            self._in_modules = True
        if tag == "tr" and self._in_modules and "tbody" in self.stack:
            self.module_rows += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "table":
            self._in_modules = False

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] in ("script", "style"):
            return
        self.text.append(data)

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())

    def find(self, tag: str, **attrs: str) -> list[dict]:
        return [
            a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())
        ]


def parse(text: str) -> Page:
    page = Page(text)
    assert not page.errors, page.errors
    assert text.startswith("<!DOCTYPE html>")
    return page


def assert_self_contained(page: Page) -> None:
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "ftp:")), (tag, attrs)
            assert "http" not in value.split(",")[0], (tag, key, value[:80])
    assert [a for a in page.find("link")] == []
    assert all("src" not in a for a in page.find("script"))  # inline scripts only


def assert_figures(page: Page, figures: list[Figure]) -> None:
    imgs = {a.get("data-name"): a for a in page.find("img")}
    for fig in figures:
        assert fig.name in imgs, f"figure {fig.name} missing"
        src = imgs[fig.name]["src"]
        assert src.startswith("data:image/png;base64,") and len(src) > 40
        assert imgs[fig.name]["alt"] == fig.title
        assert fig.caption in page.plain


# ---------------------------------------------------------------------- fixtures


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    head = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(b"\0\xff\xff\xff"))
        + chunk(b"IEND", b"")
    )


def fake_figures(out_dir: Path, n: int = 2) -> list[Figure]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = []
    for i in range(n):
        path = out_dir / f"fake-{i}.png"
        path.write_bytes(tiny_png())
        figs.append(Figure(f"fake-{i}", f"Fake plot {i}", path, f"Caption of fake plot {i}."))
    return figs


def figures_for(store: TraceStore, run_dir: Path) -> list[Figure]:
    """The real plots when stabilizer.reports.plots exists, else fake PNGs."""
    try:
        from stabilizer.reports.plots import make_figures
    except ImportError:
        return fake_figures(run_dir / "report")
    return make_figures(store, run_dir / "report")


def config(run_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig.smoke(
        run_dir, **{"max_steps": 6, "save_every": None, "trace": True, **overrides}
    )


def render(run_dir: Path, figures: list[Figure] | None = None) -> tuple[str, list[Figure], dict]:
    with TraceStore.open(run_dir / "trace.db") as store:
        figs = figures_for(store, run_dir) if figures is None else figures
        info = {"modules": store.modules(), "anomalies": store.anomalies()}
        return render_html(store, run_dir, figs), figs, info


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("healthy") / "run"
    train(config(run_dir), console=Console(record=True, width=120))
    return run_dir


@pytest.fixture(scope="module")
def classic(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("classic") / "run"
    with pytest.raises(NumericalAnomalyError):
        train(config(run_dir, adapter_dtype="fp16"), console=Console(record=True, width=120))
    return run_dir


def hand_store(
    run_dir: Path, *, steps: int = 2, full: bool = True, label: str = "module", anomalies=()
) -> TraceStore:
    """A small store written by hand: 3 modules (module 0 is attention), 2 params."""
    n = 3
    store = TraceStore.create(
        run_dir / "trace.db",
        meta={
            "config": {"model": "tiny", "precision": "fp32", "lora": {"targets": "x", "rank": 2}}
        },
    )
    store.register_modules(
        [
            ModuleInfo(i, f"qformer.encoder.layer.{i}.{label}", f"{label} {i}", "self-attn", i,
                       "qformer", i == 0)
            for i in range(n)
        ]
    )  # fmt: skip
    store.register_params(
        [ParamInfo(i, f"p{i}.lora_A.weight", f"p{i}", i, 8 * (i + 1), "float32") for i in (0, 1)]
    )
    for step in range(steps):
        data = StepData(step=step, loss=1.0 / (step + 1), lr=1e-3, grad_norm=0.5, full=full)
        if full:
            for k, site in enumerate(SITES):
                stats = np.full((n, len(TENSOR_STATS)), 0.0)
                stats[:, 0] = [1.5, 25123.4, 3.0]  # absmax
                stats[:, 1] = 0.123456  # rms
                if step == steps - 1 and site == "fwd_out":
                    stats[1, 3] = 4  # NaN count: module 1 went non-finite
                data.module_stats[site] = stats
                data.fire_order[site] = np.arange(n) + k * n
            data.score_max = np.array([17.25, np.nan, np.nan])
        store.append_step(data)
    for a in anomalies:
        store.append_anomaly(**a)
    return store


# ---------------------------------------------------------------------- real runs


def test_healthy_run_page(healthy: Path) -> None:
    text, figs, info = render(healthy)
    page = parse(text)
    assert_self_contained(page)
    assert_figures(page, figs)
    assert figs, "a healthy traced run has plots"
    plain = page.plain
    assert "completed" in plain and "partial" not in plain and "stopped on" not in plain
    assert "0 anomalies, 0 early warnings" in plain
    assert "accuracy: real images" in plain
    assert page.find("article") == []  # no diagnosis card
    assert "No NaN/Inf anomaly" in plain
    assert page.module_rows == len(info["modules"]) > 0
    assert "tiny-instructblip-t5" in plain and "targets attention, rank 4" in plain
    assert page.find("body") and page.find("script")
    assert 'document.body.dataset.ready = "1"' in text


def test_classic_fp16_page_names_offender_cause_fix_and_repro(classic: Path) -> None:
    text, figs, info = render(classic)
    page = parse(text)
    assert_self_contained(page)
    assert_figures(page, figs)
    plain = page.plain
    [anomaly] = [a for a in info["anomalies"] if not a["evidence"].get("warning")]
    label = anomaly["evidence"]["module"]
    assert anomaly["step"] == 0 and label
    assert "stopped on an anomaly" in plain
    assert f"NaN/Inf at step 0, {anomaly['pass']} pass in {label}" in plain
    assert "eps=1e-08 rounds to 0" in plain
    assert anomaly["fix"] in plain and "--adapter-dtype fp32" in plain
    assert anomaly["evidence"]["module_path"] in plain
    assert page.find("article", **{"class": "card anomaly"})
    assert "1 anomaly, 0 early warnings" in plain
    if (classic / "repro" / "step-00000000").is_dir():
        assert page.find("a", href="repro/step-00000000/")
    assert "raise" in plain  # the action timeline
    # The offender's module row is flagged.
    assert f"anomaly at step 0 ({anomaly['pass']})" in plain
    assert page.module_rows == len(info["modules"])


def test_write_report_end_to_end(healthy: Path) -> None:
    """write_report (real plots when plots.py exists) shows every PNG it wrote."""
    pytest.importorskip("stabilizer.reports.plots")
    from stabilizer.reports import write_report

    target = write_report(healthy)
    page = parse(target.read_text(encoding="utf-8"))
    assert_self_contained(page)
    names = {a.get("data-name") for a in page.find("img")}
    pngs = {p.stem for p in (healthy / "report").glob("*.png")}
    assert pngs and pngs <= names


# ---------------------------------------------------------------------- hand-made stores


def test_hostile_strings_are_escaped(tmp_path: Path) -> None:
    anomaly = dict(
        step=1,
        pass_="forward",
        module_id=0,
        op=EVIL,
        cause=EVIL,
        summary=EVIL,
        fix=EVIL,
        evidence={"module": EVIL, "module_path": EVIL, EVIL: EVIL, "nested": {"k": [EVIL]}},
    )
    with hand_store(tmp_path, label=EVIL, anomalies=[anomaly]) as store:
        store.append_action(step=1, action="skip", detail=EVIL)
        store.set_meta(config={"model": EVIL, "lora": {"targets": EVIL, "rank": EVIL}})
    figs = [Figure(EVIL, EVIL, fake_figures(tmp_path / "report", 1)[0].path, EVIL)]
    text, _, _ = render(tmp_path, figs)
    page = parse(text)
    assert len(page.find("script")) == 1  # only the page's own
    assert [a for a in page.find("img") if a.get("src") == "x"] == []
    assert not any("onerror" in a for _, a in page.tags)
    assert "<script>alert" not in text and "&lt;script&gt;alert" in text
    assert EVIL in page.plain  # shown as text, not run
    assert_figures(page, figs)


def test_partial_store_without_eval_says_partial(tmp_path: Path) -> None:
    hand_store(tmp_path, steps=2).close()
    text, _, info = render(tmp_path, [])
    page = parse(text)
    plain = page.plain
    assert "partial (killed or still running)" in plain
    assert "0..1 (2 steps, 2 with full statistics)" in plain
    assert "No plots were made" in plain
    assert page.module_rows == len(info["modules"]) == 3
    # Module 1 had NaN at the last step: counted and marked for the checkbox filter.
    bad = [a for a in page.find("tr") if a.get("data-bad") == "1"]
    assert len(bad) == 1
    assert "2.51e4" in plain and "0.123" in plain and "17.2" in plain  # 3 significant digits


def test_store_without_full_steps_and_with_no_steps(tmp_path: Path) -> None:
    hand_store(tmp_path / "a", steps=3, full=False).close()
    page = parse(render(tmp_path / "a", [])[0])
    assert "0..2 (3 steps, 0 with full statistics)" in page.plain
    assert "No step recorded full statistics" in page.plain
    hand_store(tmp_path / "b", steps=0).close()
    page = parse(render(tmp_path / "b", [])[0])
    assert "steps recorded none" in page.plain
    assert page.module_rows == 3


def test_completed_and_stopped_status(tmp_path: Path) -> None:
    with hand_store(tmp_path / "stop") as store:
        store.append_action(step=1, action="stop", detail="too many anomalies")
    assert "stopped on an anomaly" in parse(render(tmp_path / "stop", [])[0]).plain
    hand_store(tmp_path / "done").close()
    (tmp_path / "done" / "eval.json").write_text(
        json.dumps({"step": 2, "results": {"real": {"accuracy": 0.5}}, "majority_baseline": {}})
    )
    plain = parse(render(tmp_path / "done", [])[0]).plain
    assert "completed" in plain and "real images 0.500" in plain


def test_cards_evidence_warnings_and_repro_link(tmp_path: Path) -> None:
    hard = dict(
        step=1,
        pass_="backward",
        module_id=2,
        op="mul",
        cause="backward-overflow",
        summary="a gradient went non-finite",
        fix="Use bf16",
        evidence={
            "module": "module 2",
            "module_path": "qformer.encoder.layer.2.module",
            "warning": False,
            "limits": {"fp16": 65504.0, "inner": {"x": 1}},
            "steps": list(range(20)),
            "absmax": float("inf"),
        },
    )
    warn = dict(
        hard,
        step=0,
        pass_="forward",
        module_id=1,
        cause="near-overflow",
        evidence={"module": "module 1", "warning": True, "absmax": 40000.0},
    )
    hand_store(tmp_path, anomalies=[warn, hard]).close()
    (tmp_path / "repro" / "step-00000001").mkdir(parents=True)
    page = parse(render(tmp_path, [])[0])
    plain = page.plain
    assert "limits.fp16 6.55e+04" in plain and "limits.inner.x 1" in plain
    assert "0, 1, 2, 3, 4, 5, ... (20 in all)" in plain
    assert "absmax Inf" in plain
    assert "1 anomaly, 1 early warning" in plain
    assert "NaN/Inf at step 1, backward pass in module 2 (op mul)" in plain
    assert "warning at step 0, forward pass in module 1" in plain
    # The warning sits in a collapsed <details>, after the anomaly card.
    assert page.find("details", **{"class": "warnings"})
    assert plain.index("NaN/Inf at step 1") < plain.index("warning at step 0, forward")
    assert page.find("a", href="repro/step-00000001/")
    assert "anomaly at step 1 (backward)" in plain and "warning at step 0 (forward)" in plain


def test_unreadable_figure_still_listed(tmp_path: Path) -> None:
    hand_store(tmp_path).close()
    (tmp_path / "empty.png").write_bytes(b"")
    figs = [
        Figure("gone", "Gone plot", tmp_path / "nope.png", "Caption gone."),
        Figure("empty", "Empty plot", tmp_path / "empty.png", "Caption empty."),
    ]
    page = parse(render(tmp_path, figs)[0])
    assert page.find("img") == []  # no broken <img>
    assert page.find("figure", id="fig-gone") and page.find("figure", id="fig-empty")
    assert "could not be read" in page.plain and "is empty" in page.plain
    assert "Caption gone." in page.plain and "Caption empty." in page.plain


def test_number_formatting() -> None:
    from stabilizer.reports.html import _num

    assert _num(float("nan")) == "\u2013" and _num(None) == "\u2013"
    assert _num(float("inf")) == "Inf" and _num(float("-inf")) == "-Inf"
    assert _num(0.000123456) == "0.000123" and _num(1.23456e-7) == "1.23e-7"
    assert _num(12345.678) == "1.23e4" and _num(3.0) == "3" and _num(65504.0) == "65504"


def test_html_module_does_not_import_torch() -> None:
    code = (
        "import sys, stabilizer.reports.html\nassert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
