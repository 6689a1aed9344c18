"""Bad data a user may hand stabilizer, and what they see.

Each table row builds one bad input in ``tmp_path`` and states what must come out:
the error type (or the CLI's exit code) and the words of the message, which must
name the file, the line or field, and what to do. Add a row for each new kind of
bad input rather than a new test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from data_fixtures import make_iconqa, make_jsonl, make_scienceqa, write_png
from PIL import Image
from test_cli import QUICK

from stabilizer.cli import main
from stabilizer.data import VQASample, check_samples, load_image, load_jsonl, load_samples
from stabilizer.errors import BadSampleError
from stabilizer.train import majority_baseline

GOOD = {"image": "images/ok.png", "question": "What colour?", "answer": "red"}
GOOD_LINE = json.dumps(GOOD).encode()
SKIP_HINT = "--on-bad-sample skip"


def write_jsonl_bytes(folder: Path, lines: list[bytes], name: str = "data.jsonl") -> Path:
    """Write raw ``lines`` (bytes, joined by newlines) to ``folder/name``, next to a valid
    ``images/ok.png``; returns the file's path."""
    write_png(folder / "images" / "ok.png", "red", "circle")
    path = folder / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def invoke(*args: str):
    """Run the CLI as a user would; stderr is kept apart from stdout."""
    return CliRunner().invoke(main, [str(a) for a in args])


def words(text: str) -> str:
    """``text`` with every run of whitespace (rich's line wrapping) made one space."""
    return " ".join(text.split())


# --- 1. encodings ------------------------------------------------------------------

WHOLE_FILE = (GOOD_LINE.decode() + "\n") * 2

# id -> (the file's bytes, line named, words the message must hold)
ENCODING_CASES = {
    "0xff-byte": (
        GOOD_LINE + b"\n" + GOOD_LINE.replace(b"What", b"What\xff"),
        2,
        ["is not UTF-8 text", "byte 0xff", "must be UTF-8", "Re-save the file as UTF-8"],
    ),
    "latin-1-text": (
        b"\n".join([GOOD_LINE, GOOD_LINE, '{"answer": "café"}'.encode("latin-1")]),
        3,
        ["is not UTF-8 text", "byte 0xe9", "must be UTF-8", "iconv -f CP1252 -t UTF-8"],
    ),
    "utf-16-le-bom": (
        WHOLE_FILE.encode("utf-16"),  # Python writes the little-endian mark first
        1,
        ["UTF-16 (little-endian) byte-order mark", "looks UTF-16 encoded", "iconv -f UTF-16"],
    ),
    "utf-16-be-bom": (
        b"\xfe\xff" + WHOLE_FILE.encode("utf-16-be"),
        1,
        ["UTF-16 (big-endian) byte-order mark", "must be UTF-8"],
    ),
    "utf-32-le-bom": (
        WHOLE_FILE.encode("utf-32"),
        1,
        ["UTF-32 (little-endian) byte-order mark", "looks UTF-32 encoded", "iconv -f UTF-32"],
    ),
    "utf-16-no-bom": (
        WHOLE_FILE.encode("utf-16-le"),
        1,
        ["holds NUL bytes", "looks UTF-16 or UTF-32 encoded", "must be UTF-8"],
    ),
}


@pytest.mark.parametrize(
    ("content", "line", "expected"), ENCODING_CASES.values(), ids=ENCODING_CASES
)
def test_non_utf8_jsonl_names_file_line_and_encoding(
    tmp_path: Path, content: bytes, line: int, expected: list[str]
) -> None:
    path = write_jsonl_bytes(tmp_path, [content])
    with pytest.raises(BadSampleError) as caught:
        load_jsonl(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, line {line}: "), message
    for text in expected:
        assert text in message, message
    assert caught.value.__cause__ is None  # no UnicodeDecodeError trace behind it


def test_utf8_with_byte_order_mark_still_loads(tmp_path: Path) -> None:
    path = write_jsonl_bytes(tmp_path, [b"\xef\xbb\xbf" + GOOD_LINE, GOOD_LINE])
    assert [s.extra["line"] for s in load_jsonl(path)] == [1, 2]


# --- 2. high bit depth images --------------------------------------------------------

RAMP = np.linspace(0, 1, 256)


def _stretch(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) * 255 / (values.max() - values.min())


# id -> (array saved, file suffix, PIL mode it must open as, expected 8-bit values)
DEPTH_CASES = {
    "png-16-bit": (
        np.rint(RAMP * 65535).astype(np.uint16), ".png", "I;16", np.rint(RAMP * 65535) / 257,
    ),
    "tiff-32-bit-int-wide": (
        np.rint(1000 + RAMP * 4000).astype(np.int32), ".tiff", "I",
        _stretch(np.rint(1000 + RAMP * 4000)),
    ),
    "tiff-32-bit-int-in-8-bit-range": (
        np.arange(256, dtype=np.int32), ".tiff", "I", np.arange(256),
    ),
    "tiff-float-0-to-1": (RAMP.astype(np.float32), ".tiff", "F", RAMP.astype(np.float32) * 255),
    "tiff-float-signed": (
        (RAMP * 2 - 1).astype(np.float32), ".tiff", "F", _stretch((RAMP * 2 - 1).astype(np.float32)),
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("values", "suffix", "mode", "expected"), DEPTH_CASES.values(), ids=DEPTH_CASES
)
def test_high_bit_depth_gray_is_scaled_not_clipped(
    tmp_path: Path, values: np.ndarray, suffix: str, mode: str, expected: np.ndarray
) -> None:
    path = tmp_path / f"ramp{suffix}"
    Image.fromarray(np.tile(values, (8, 1))).save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the file really is what the row says
    rgb = np.asarray(load_image(VQASample("x", "test record", path, "q", "a")))
    assert rgb.shape == (8, 256, 3)
    assert (rgb == 255).mean() < 0.01  # convert("RGB") alone made ~all of it white
    for channel in range(3):
        # One level of slack: value >> 8 is as right for 16 bits as value / 257.
        np.testing.assert_allclose(rgb[0, :, channel], np.rint(expected), atol=1)


# --- 3 and 4. data reaching rich, and the "all" row ------------------------------------

MARKUP = " [/]"  # a closing tag with nothing open: rich raises MarkupError on it


def _with_markup(record: dict, typed: bool) -> dict:
    """``record`` with "[/]" in its answer and choices, and in its type or with none."""
    out = {**record, "answer": record["answer"] + MARKUP}
    out["choices"] = [c + MARKUP for c in record["choices"]]
    out.pop("type")
    if typed:
        out["type"] = record["type"] + MARKUP
    return out


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory):
    """A run trained on a JSONL folder whose types and answers hold rich markup.

    ``train.jsonl`` and ``test.jsonl`` leave every third line without a type;
    ``notype.jsonl`` gives no line a type. Returns (run folder, train result, folder).
    """
    root = tmp_path_factory.mktemp("bad-data")
    source = make_jsonl(root, n=9)
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    folder = source.parent
    for split in ("train", "test"):
        lines = [json.dumps(_with_markup(r, typed=i % 3 != 2)) for i, r in enumerate(records)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    notype = [json.dumps({k: v for k, v in r.items() if k != "type"}) for r in records]
    (folder / "notype.jsonl").write_text("\n".join(notype) + "\n", encoding="utf-8")
    source.unlink()
    run_dir = root / "run"
    result = invoke(
        "train", *QUICK, "--max-eval-samples", 9, "--dataset", folder, "--run-dir", run_dir,
        "--trace",
    )  # fmt: skip
    return run_dir, result, folder


def _table_rows(output: str) -> list[str]:
    """The "type (count)" labels of the accuracy table's rows, markup shown literally."""
    table = output[output.index("Test accuracy") :]
    return [words(m) for m in re.findall(r"│ ([^│]*?\(\d+\)) *│", table)]


def test_markup_in_types_and_answers_trains_and_prints_literally(markup_run) -> None:
    run_dir, result, _ = markup_run
    assert result.exit_code == 0, result.output
    # Records 0-8: colour 0, 4, 6; shape 1, 3, 7; untyped 2, 5, 8 (counted in "all" only).
    rows = _table_rows(result.stdout)
    assert rows == ["colour [/] (3)", "shape [/] (3)", "all (9)"], result.stdout
    assert (run_dir / "report.html").is_file()  # the traced run's report was written


def test_eval_prints_markup_literally(markup_run) -> None:
    run_dir, _, _ = markup_run
    result = invoke("eval", run_dir, "--images", "real")
    assert result.exit_code == 0, result.output
    assert _table_rows(result.stdout) == ["colour [/] (3)", "shape [/] (3)", "all (9)"]


def test_untyped_dataset_prints_the_all_row_once(markup_run) -> None:
    run_dir, _, _ = markup_run
    result = invoke("eval", run_dir, "--images", "real", "--split", "notype")
    assert result.exit_code == 0, result.output
    assert _table_rows(result.stdout) == ["all (9)"], result.stdout


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        ((None, None, None), {"all": 2 / 3}),
        (("a", None, None), {"all": 2 / 3, "a": 1.0}),
    ],
    ids=["untyped", "mixed"],
)
def test_majority_baseline_all_is_the_overall_figure(tmp_path, types, expected) -> None:
    samples = [
        VQASample(f"s{i}", "test", tmp_path / "x.png", "q", answer, question_type=t or "all")
        for i, (answer, t) in enumerate(zip(["red", "blue", "red"], types, strict=True))
    ]
    train = [VQASample("t", "test", tmp_path / "x.png", "q", "red")]
    assert majority_baseline(train, samples) == pytest.approx(expected)


# --- 5. --on-bad-sample skip: every line that suggests it can be skipped ---------------

# id -> (the bad line, words its message must hold)
BAD_LINES = {
    "no-answer": (json.dumps({"image": "images/ok.png", "question": "q"}), "has no 'answer' field"),
    "no-image": (json.dumps({"question": "q", "answer": "a"}), "has no 'image' field"),
    "not-json": ('{"image": "images/ok.png", "question": ', "is not valid JSON"),
    "not-an-object": ('["a", "list"]', "should be a JSON object, got list"),
    "answer-not-text": (json.dumps({**GOOD, "answer": ["red"]}), "field 'answer' should be text"),
    "latin-1-line": (json.dumps({**GOOD, "question": "été?"}, ensure_ascii=False)
                     .encode("latin-1"), "is not UTF-8 text"),
    "repeated-id": (json.dumps({**GOOD, "id": "a"}), "repeats id 'a' first used on line 1"),
}  # fmt: skip


@pytest.mark.parametrize(("line", "reason"), BAD_LINES.values(), ids=BAD_LINES)
def test_bad_jsonl_line_errors_or_is_skipped(tmp_path: Path, line, reason: str) -> None:
    raw = line if isinstance(line, bytes) else line.encode()
    first = json.dumps({**GOOD, "id": "a"}).encode()
    path = write_jsonl_bytes(tmp_path, [first, raw, GOOD_LINE])
    with pytest.raises(BadSampleError) as caught:
        load_samples(str(path), "train")
    assert str(caught.value).startswith(f"{path}, line 2: {reason}"), str(caught.value)

    skipped: list[BadSampleError] = []
    samples = load_samples(str(path), "train", skipped=skipped)
    assert [s.extra["line"] for s in samples] == [1, 3]
    assert [str(e) for e in skipped] == [str(caught.value)]


def test_utf16_file_is_not_skipped_line_by_line(tmp_path: Path) -> None:
    path = write_jsonl_bytes(tmp_path, [WHOLE_FILE.encode("utf-16")])
    with pytest.raises(BadSampleError, match="UTF-16"):
        load_samples(str(path), "train", skipped=[])


def _break_iconqa(root: Path) -> Path:
    folder = make_iconqa(root, n_per_split=3)
    bad = folder / "train" / "choose_txt" / "2" / "data.json"
    bad.write_text(json.dumps({"choices": ["a"], "answer": 0}))
    return folder


def _break_scienceqa(root: Path) -> Path:
    folder = make_scienceqa(root, n_per_split=3)
    problems = json.loads((folder / "problems.json").read_text())
    problems["2"]["answer"] = 9
    (folder / "problems.json").write_text(json.dumps(problems))
    return folder


@pytest.mark.parametrize(
    ("make", "reason"),
    [(_break_iconqa, "has no 'question' text"), (_break_scienceqa, "has answer 9")],
    ids=["iconqa", "scienceqa"],
)
def test_bad_record_of_other_layouts_is_skipped(tmp_path: Path, make, reason: str) -> None:
    spec = str(make(tmp_path))
    with pytest.raises(BadSampleError, match=reason):
        load_samples(spec, "train")
    skipped: list[BadSampleError] = []
    assert len(load_samples(spec, "train", skipped=skipped)) == 2
    assert len(skipped) == 1 and reason in str(skipped[0])


def test_empty_choice_is_caught_before_training(tmp_path: Path) -> None:
    path = write_jsonl_bytes(
        tmp_path, [json.dumps({**GOOD, "choices": ["red", " "]}).encode(), GOOD_LINE]
    )
    with pytest.raises(BadSampleError, match=r"line 1: choice 2 of its 2 choices is empty"):
        check_samples(load_jsonl(path))


# --- the command line: exit code, and the message on stderr ---------------------------


def _missing_answer(folder: Path) -> Path:
    lines = [GOOD_LINE] * 4 + [json.dumps({"image": "images/ok.png", "question": "q"}).encode()]
    return write_jsonl_bytes(folder, lines)


def _latin1_line(folder: Path) -> Path:
    bad = json.dumps({**GOOD, "question": "été?"}, ensure_ascii=False).encode("latin-1")
    return write_jsonl_bytes(folder, [GOOD_LINE] * 2 + [bad] + [GOOD_LINE] * 2)


def _utf16(folder: Path) -> Path:
    return write_jsonl_bytes(folder, [((GOOD_LINE.decode() + "\n") * 5).encode("utf-16")])


# id -> (dataset builder, extra options, exit code, words on stderr, words on stdout)
CLI_CASES = {
    "missing-answer": (_missing_answer, [], 2, ["line 5: has no 'answer' field", SKIP_HINT], []),
    "missing-answer-skipped": (
        _missing_answer, ["--on-bad-sample", "skip"], 0, [],
        ["skipped 1 bad sample(s) of split 'train'", "line 5: has no 'answer' field"],
    ),
    "latin-1": (_latin1_line, [], 2, ["line 3: is not UTF-8 text", "byte 0xe9"], []),
    "latin-1-skipped": (
        _latin1_line, ["--on-bad-sample", "skip"], 0, [], ["skipped 1 bad sample(s)"],
    ),
    "utf-16-even-with-skip": (
        _utf16, ["--on-bad-sample", "skip"], 2, ["line 1: starts with a UTF-16", "iconv"], [],
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("make", "extra", "code", "on_stderr", "on_stdout"), CLI_CASES.values(), ids=CLI_CASES
)
def test_cli_reports_bad_data_without_traceback(
    tmp_path: Path, make, extra: list[str], code: int, on_stderr: list[str], on_stdout: list[str]
) -> None:
    path = make(tmp_path / "data")
    result = invoke("check", *QUICK, "--dataset", path, *extra)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for text in on_stderr:
        assert text in words(result.stderr), result.stderr
    if on_stderr:
        assert str(path) in words(result.stderr)
    for text in on_stdout:
        assert text in words(result.stdout), result.stdout


# --- predict: advice that predict can take ---------------------------------------------


def _garbage_image(tmp_path: Path) -> Path:
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png")
    return path


PREDICT_CASES = {
    "missing-image": (lambda tmp: tmp / "none.png", [], ["none.png", "does not exist", "--image"]),
    "undecodable-image": (_garbage_image, [], ["broken.png", "cannot be decoded", "--image"]),
    "empty-choice": (
        lambda tmp: write_png(tmp / "ok.png", "red", "circle"),
        ["--choices", "red,,blue"],
        ["--choices 'red,,blue' has an empty choice"],
    ),
}


@pytest.mark.parametrize(("make", "extra", "expected"), PREDICT_CASES.values(), ids=PREDICT_CASES)
def test_predict_errors_give_advice_predict_has(markup_run, tmp_path, make, extra, expected):
    run_dir, _, _ = markup_run
    image = make(tmp_path)
    result = invoke("predict", run_dir, "--image", image, "--question", "q", *extra)
    assert result.exit_code == 2, result.output
    message = words(result.stderr)
    for text in expected:
        assert text in message, message
    assert "--on-bad-sample" not in message  # predict has no such option
    predict_help = invoke("predict", "--help").output
    assert "--on-bad-sample" not in predict_help and "--image" in predict_help
