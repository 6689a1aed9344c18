"""Tests for the data package: loaders, spec resolution and sample checks.

Error tests assert on the message the user sees: it must name the file and the
record, so a bad line in a 100k-line file can be found.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_fixtures import (
    SPLITS,
    TEXT_ONLY_PER_SPLIT,
    make_iconqa,
    make_jsonl,
    make_scienceqa,
    write_png,
)
from PIL import Image

from stabilizer.data import (
    VQASample,
    check_samples,
    format_prompt,
    load_easy_vqa,
    load_iconqa,
    load_image,
    load_jsonl,
    load_samples,
    load_scienceqa,
    resolve_spec,
)
from stabilizer.data import validate as validate_module
from stabilizer.errors import BadSampleError, ConfigError


def write_jsonl(folder: Path, records: list[dict | str]) -> Path:
    """Write ``records`` (dicts, or raw text for broken lines) to ``folder/data.jsonl``.

    Every record may use ``images/ok.png``, which is written as a valid picture.
    """
    write_png(folder / "images" / "ok.png", "red", "circle")
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = {"image": "images/ok.png", "question": "What colour?", "answer": "red"}


# --- prompt format -----------------------------------------------------------------


def test_format_prompt_open_question_is_the_question() -> None:
    assert format_prompt("  What colour is it? ") == "What colour is it?"


def test_format_prompt_lists_lettered_options_after_context() -> None:
    prompt = format_prompt("Which?", ["cat", "dog\nhouse"], context="Line one.\nLine two.")
    assert prompt == (
        "Context: Line one. Line two.\nQuestion: Which?\nOptions: (A) cat (B) dog house\nAnswer:"
    )


# --- loaders on fixtures -----------------------------------------------------------


def test_scienceqa_keeps_image_records_of_the_split(tmp_path: Path) -> None:
    root = make_scienceqa(tmp_path, n_per_split=6)
    problems = json.loads((root / "problems.json").read_text())
    assert len(problems) == len(SPLITS) * (6 + TEXT_ONLY_PER_SPLIT)

    for split in SPLITS:
        samples = load_scienceqa(root, split)
        assert len(samples) == 6
        pids = [int(s.extra["pid"]) for s in samples]
        assert pids == sorted(pids)  # numeric order, "10" after "9"
        for s in samples:
            assert problems[s.extra["pid"]]["split"] == split
            assert problems[s.extra["pid"]]["image"] == "image.png"
            assert s.choices and s.answer in s.choices
            assert "Options: (A) " in s.prompt and s.prompt.endswith("\nAnswer:")
            assert s.question_type in {"natural science", "language science"}
            assert s.sample_id == f"scienceqa/{split}/{s.extra['pid']}"
            assert "problems.json" in s.source and repr(s.extra["pid"]) in s.source
    # Records with a hint show it as context; the others have no context line.
    train = load_scienceqa(root, "train")
    assert any(s.prompt.startswith("Context: The picture") for s in train)
    assert any(s.prompt.startswith("Question: ") for s in train)
    image = load_image(train[0])
    assert image.mode == "RGB" and image.size == (32, 32)


def test_scienceqa_answer_is_the_indexed_option(tmp_path: Path) -> None:
    root = make_scienceqa(tmp_path, n_per_split=2)
    problems = json.loads((root / "problems.json").read_text())
    for s in load_scienceqa(root, "val"):
        record = problems[s.extra["pid"]]
        assert s.answer == record["choices"][record["answer"]]
        assert s.choices == tuple(record["choices"])


def test_iconqa_loads_choose_txt_only(tmp_path: Path) -> None:
    root = make_iconqa(tmp_path, n_per_split=5)
    for split in SPLITS:
        samples = load_iconqa(root, split)
        assert len(samples) == 5  # the choose_img question is ignored
        assert all(s.question_type == "choose_txt" for s in samples)
        assert all(s.answer in s.choices and "Options: (A) " in s.prompt for s in samples)
        assert all(s.source.endswith("data.json") for s in samples)
    assert load_image(load_iconqa(root, "test")[0]).size == (32, 32)


def test_iconqa_tolerates_release_nesting(tmp_path: Path) -> None:
    made = make_iconqa(tmp_path / "build", n_per_split=2)
    nested = tmp_path / "download" / "iconqa_data" / "iconqa"
    shutil.move(str(made), str(nested))
    samples = load_samples(str(tmp_path / "download"), "val")
    assert len(samples) == 2 and "iconqa_data/iconqa/val/choose_txt" in samples[0].source


def test_jsonl_loads_records_with_line_numbers(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path, n=8)
    samples = load_jsonl(path)
    assert len(samples) == 8  # the blank line is ignored
    assert [s.extra["line"] for s in samples] == [1, 2, 3, 5, 6, 7, 8, 9]
    assert samples[3].source == f"{path}, line 5"
    assert samples[0].sample_id == "data/q0"
    assert samples[0].image_path == path.parent / "images" / "0.png"
    assert {s.question_type for s in samples} == {"colour", "shape"}
    assert all(s.answer in s.choices and "Options: (A) " in s.prompt for s in samples)
    assert load_image(samples[0]).mode == "RGB"


def test_jsonl_open_questions_and_absolute_paths(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path, n=3, with_choices=False)
    samples = load_jsonl(path)
    assert samples[0].choices is None and samples[0].prompt == "What colour is the shape?"
    absolute = write_png(tmp_path / "elsewhere" / "x.png", "blue", "square")
    other = write_jsonl(tmp_path / "abs", [{**GOOD, "image": str(absolute)}])
    (sample,) = load_jsonl(other)
    assert sample.image_path == absolute and sample.question_type == "all"
    assert sample.sample_id == "data/line-1"


def test_easy_vqa_real_data_with_limit() -> None:
    samples = load_easy_vqa("train", limit=60)
    assert len(samples) == 60
    assert [s.sample_id for s in samples[:2]] == ["easy-vqa/train/0", "easy-vqa/train/1"]
    assert samples[7].source == "easy-vqa train question 7"
    assert {s.question_type for s in samples} == {"colour", "shape", "yes/no"}
    for s in samples:
        assert len(s.choices) == 13 and list(s.choices) == sorted(s.choices)
        assert s.answer in s.choices and s.prompt == s.prompt.strip() != ""
    good, bad = check_samples(samples)
    assert len(good) == 60 and bad == []
    assert load_image(samples[0]).size == (64, 64)


def test_check_samples_decodes_each_image_once(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = load_easy_vqa("test", limit=3000)
    calls: list[Path] = []
    original = validate_module._image_problem

    def counting(path: Path) -> str | None:
        calls.append(path)
        return original(path)

    monkeypatch.setattr(validate_module, "_image_problem", counting)
    good, _ = check_samples(samples)
    assert len(good) == 3000
    assert len(calls) == len(set(calls)) == len({s.image_path for s in samples}) < 3000


def test_rgba_transparency_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    sample = VQASample("x", "test record", path, "q", "a")
    assert load_image(sample).getpixel((0, 0)) == (255, 255, 255)


# --- registry ----------------------------------------------------------------------


def test_registry_detects_each_layout(tmp_path: Path) -> None:
    assert resolve_spec(str(make_scienceqa(tmp_path)))[0] == "scienceqa"
    assert resolve_spec(str(make_iconqa(tmp_path)))[0] == "iconqa"
    jsonl_file = make_jsonl(tmp_path)
    assert resolve_spec(str(jsonl_file))[0] == "jsonl"
    assert resolve_spec(str(jsonl_file.parent))[0] == "jsonl"
    assert resolve_spec("easy-vqa") == ("easy-vqa", None)


def test_registry_loads_explicit_and_bare_specs(tmp_path: Path) -> None:
    sqa, icon, jsonl = make_scienceqa(tmp_path), make_iconqa(tmp_path), make_jsonl(tmp_path)
    assert load_samples(f"scienceqa:{sqa}", "train") == load_samples(str(sqa), "train")
    assert len(load_samples(f"iconqa:{icon}", "validation")) == 6  # alias of "val"
    # One .jsonl file serves every split; limit keeps the first N.
    assert len(load_samples(f"jsonl:{jsonl}", "test")) == 8
    first = load_samples(str(jsonl), "train", limit=3)
    assert [s.sample_id for s in first] == ["data/q0", "data/q1", "data/q2"]
    assert len(load_samples("easy-vqa", "test", limit=4)) == 4


def test_registry_reads_split_files_of_a_jsonl_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    write_jsonl(folder, [GOOD])
    (folder / "data.jsonl").rename(folder / "train.jsonl")
    (folder / "val.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    assert len(load_samples(str(folder), "train")) == 1
    assert len(load_samples(f"jsonl:{folder}", "val")) == 2
    with pytest.raises(ConfigError, match=r"no split 'test'.*splits are train, val"):
        load_samples(str(folder), "test")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("imagenet:/x", r"unknown dataset kind 'imagenet'.*accepted forms"),
        ("no-such-dataset", r"'no-such-dataset' is not a known dataset.*scienceqa:PATH"),
        ("scienceqa:/no/such/dir", r"/no/such/dir .*does not exist"),
        ("", r"empty.*accepted forms"),
        ("jsonl:", r"'jsonl:' has no path"),
    ],
)
def test_registry_rejects_unknown_specs(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_samples(spec, "train")


def test_registry_names_missing_problems_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no problems\.json"):
        load_samples(f"scienceqa:{tmp_path / 'empty'}", "train")
    with pytest.raises(ConfigError, match=r"holds no problems\.json.*accepted forms"):
        load_samples(str(tmp_path / "empty"), "train")


def test_missing_split_lists_existing_splits(tmp_path: Path) -> None:
    sqa, icon = make_scienceqa(tmp_path, 1), make_iconqa(tmp_path, 1)
    shutil.rmtree(icon / "test")
    with pytest.raises(ConfigError, match=r"no split 'minitrain'; its splits are test, train, val"):
        load_samples(str(sqa), "minitrain")
    with pytest.raises(ConfigError, match=r"no split 'test'.*its splits are train, val"):
        load_samples(str(icon), "test")
    with pytest.raises(
        ConfigError, match=r"easy-vqa has no split 'val'; its splits are train, test"
    ):
        load_samples("easy-vqa", "val")


def test_limit_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="limit must be a positive whole number"):
        load_samples("easy-vqa", "train", limit=0)


# --- bad data ----------------------------------------------------------------------


def test_missing_image_names_record_and_path(tmp_path: Path) -> None:
    root = make_scienceqa(tmp_path, n_per_split=3)
    samples = load_scienceqa(root, "train")
    samples[1].image_path.unlink()
    with pytest.raises(BadSampleError) as caught:
        check_samples(samples)
    message = str(caught.value)
    assert f"problems.json, record '{samples[1].extra['pid']}'" in message
    assert str(samples[1].image_path) in message and "does not exist" in message
    assert "--on-bad-sample skip" in message
    with pytest.raises(BadSampleError, match="does not exist"):
        load_image(samples[1])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_undecodable_image_names_record_and_path(tmp_path: Path, damage: str) -> None:
    path = make_jsonl(tmp_path, n=4)
    samples = load_jsonl(path)
    image = samples[2].image_path
    data = image.read_bytes()
    # Truncation keeps a valid header, so only a full decode (not open) catches it.
    image.write_bytes(b"this is not a png" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(BadSampleError) as caught:
        check_samples(samples)
    message = str(caught.value)
    assert f"{path}, line 3" in message and str(image) in message
    assert "cannot be decoded" in message
    with pytest.raises(BadSampleError, match="cannot be decoded"):
        load_image(samples[2])


def test_empty_answer_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [GOOD, {**GOOD, "answer": "   "}])
    with pytest.raises(BadSampleError, match=r"data\.jsonl, line 2: has an empty answer"):
        check_samples(load_jsonl(path))


def test_answer_not_in_choices_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [GOOD, {**GOOD, "answer": "pink", "choices": ["red", "blue"]}])
    with pytest.raises(BadSampleError) as caught:
        check_samples(load_jsonl(path))
    assert "data.jsonl, line 2: answer 'pink' is not one of its choices ('red', 'blue')" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"image": "images/ok.png", "question": ', r"line 3: is not valid JSON"),
        ('["a", "list"]', r"line 3: should be a JSON object, got list"),
        ('{"image": "images/ok.png", "answer": "red"}', r"line 3: has no 'question' field"),
        ('{"image": "images/ok.png", "question": "q", "answer": ["red"]}', r"line 3:.*'answer'"),
        ('{"image": "x.png", "question": "q", "answer": "a", "choices": "a"}', r"'choices'"),
    ],
)
def test_malformed_jsonl_line_names_line_number(tmp_path: Path, line: str, expected: str) -> None:
    path = write_jsonl(tmp_path, [GOOD, "", line, GOOD])
    with pytest.raises(BadSampleError, match=expected) as caught:
        load_jsonl(path)
    assert str(caught.value).startswith(f"{path}, line 3: ")


def test_repeated_jsonl_id_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{**GOOD, "id": 7}, {**GOOD, "id": "7"}])
    with pytest.raises(BadSampleError, match=r"line 2: repeats id '7' first used on line 1"):
        load_jsonl(path)


def test_scienceqa_bad_answer_index_names_record(tmp_path: Path) -> None:
    root = make_scienceqa(tmp_path, n_per_split=2)
    problems = json.loads((root / "problems.json").read_text())
    problems["1"]["answer"] = 5
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(BadSampleError, match=r"problems\.json, record '1': has answer 5"):
        load_scienceqa(root, "train")


def test_skip_mode_keeps_good_samples_and_reports_bad(tmp_path: Path) -> None:
    path = make_jsonl(tmp_path, n=8)
    samples = load_jsonl(path)
    samples[0].image_path.unlink()
    samples[4].image_path.write_bytes(b"garbage")
    samples.append(VQASample("extra", "hand-made record", samples[1].image_path, "q", " "))
    good, bad = check_samples(samples, on_bad_sample="skip")
    assert len(good) == 6 and len(bad) == 3
    assert [e.source for e in bad] == [samples[0].source, samples[4].source, "hand-made record"]
    assert all(isinstance(e, BadSampleError) and e.hint for e in bad)


def test_unknown_on_bad_sample_value(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--on-bad-sample must be one of error, skip, got 'warn'"
    ):
        check_samples([], on_bad_sample="warn")
