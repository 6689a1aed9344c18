"""Tiny on-disk datasets in each supported layout, for tests.

Each builder writes real 32x32 PNGs of one coloured shape on white, with questions
about the colour or the shape, so a model could in principle learn them, and
returns the path to pass as a dataset spec:

>>> spec = make_scienceqa(tmp_path)  # doctest: +SKIP
>>> samples = load_samples(str(spec), "train")  # doctest: +SKIP

Everything is deterministic: record ``i`` always shows the same picture.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
SHAPES = ("circle", "square", "triangle")
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 32
# Records without an image that make_scienceqa adds to each split; loaders must drop them.
TEXT_ONLY_PER_SPLIT = 2


def write_png(path: Path, colour: str, shape: str, size: int = IMAGE_SIZE) -> Path:
    """Draw one ``colour`` ``shape`` on white and save it as a PNG at ``path``.

    >>> write_png(tmp_path / "a.png", "red", "circle")  # doctest: +SKIP
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    lo, hi = size // 6, size - size // 6
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=fill)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=fill)
    else:
        draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=fill)
    image.save(path)
    return path


def question_for(index: int) -> dict:
    """The picture, question, options and answer of record ``index``.

    Even records ask for the colour, odd ones for the shape; the options are three
    candidates rotated so the correct letter varies.

    >>> question_for(0)["choices"], question_for(0)["answer"]
    (['red', 'green', 'blue'], 0)
    """
    colour = list(COLOURS)[index % len(COLOURS)]
    shape = SHAPES[(index // 2) % len(SHAPES)]
    if index % 2 == 0:
        question, kind, truth, pool = "What colour is the shape?", "colour", colour, list(COLOURS)
    else:
        question, kind, truth, pool = "Which shape is in the picture?", "shape", shape, list(SHAPES)
    others = [c for c in pool if c != truth][:2]
    choices = [truth, *others]
    shift = index % len(choices)
    choices = choices[shift:] + choices[:shift]
    return {
        "colour": colour,
        "shape": shape,
        "question": question,
        "kind": kind,
        "choices": choices,
        "answer": choices.index(truth),
    }


def make_scienceqa(root: Path, n_per_split: int = 6) -> Path:
    """Write a ScienceQA-layout dataset under ``root/scienceqa`` and return that folder.

    Each split gets ``n_per_split`` records with an image plus
    ``TEXT_ONLY_PER_SPLIT`` records without one. Numeric pids run across splits
    (so the folder holds pids past 9, checking numeric order). Colour questions are
    subject "natural science", shape questions "language science"; every other
    record has a context ("hint").
    """
    folder = root / "scienceqa"
    problems: dict[str, dict] = {}
    pid = 0
    for split in SPLITS:
        for i in range(n_per_split + TEXT_ONLY_PER_SPLIT):
            pid += 1
            q = question_for(pid)
            has_image = i < n_per_split
            problems[str(pid)] = {
                "question": q["question"],
                "choices": q["choices"],
                "answer": q["answer"],
                "hint": "The picture shows one shape on a white background." if pid % 2 else "",
                "image": "image.png" if has_image else None,
                "task": "closed choice",
                "grade": "grade3",
                "subject": "natural science" if q["kind"] == "colour" else "language science",
                "topic": q["kind"],
                "split": split,
            }
            if has_image:
                write_png(
                    folder / "images" / split / str(pid) / "image.png", q["colour"], q["shape"]
                )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "problems.json").write_text(json.dumps(problems, indent=1), encoding="utf-8")
    return folder


def make_iconqa(root: Path, n_per_split: int = 6) -> Path:
    """Write an IconQA-layout dataset under ``root/iconqa`` and return that folder.

    Each split gets ``n_per_split`` ``choose_txt`` questions; the train split also
    gets one ``choose_img`` question, a sub-task the loader must ignore.
    """
    folder = root / "iconqa"
    qid = 0
    for split in SPLITS:
        for _ in range(n_per_split):
            qid += 1
            q = question_for(qid)
            question_dir = folder / split / "choose_txt" / str(qid)
            write_png(question_dir / "image.png", q["colour"], q["shape"])
            record = {
                "question": q["question"],
                "choices": q["choices"],
                "answer": q["answer"],
                "ques_type": "choose_txt",
                "grade": "prek",
                "label": q["kind"],
            }
            (question_dir / "data.json").write_text(json.dumps(record), encoding="utf-8")
    other = folder / "train" / "choose_img" / "999"
    write_png(other / "image.png", "red", "circle")
    (other / "data.json").write_text(
        json.dumps({"question": "Which is red?", "choices": ["a.png"], "answer": 0}),
        encoding="utf-8",
    )
    return folder


def make_jsonl(root: Path, n: int = 8, with_choices: bool = True) -> Path:
    """Write ``root/jsonl/data.jsonl`` with ``n`` records and return the file's path.

    Images go to ``root/jsonl/images/<i>.png`` and are referenced relative to the
    file. A blank line follows the third record (loaders must ignore it), so record
    ``i`` sits on line ``i + 1`` for ``i < 3`` and on line ``i + 2`` after. Records
    carry ``"type"`` (colour/shape) and an ``"id"`` of ``"q<i>"``; with
    ``with_choices=False`` they are open questions without ``"choices"``.
    """
    folder = root / "jsonl"
    lines = []
    for i in range(n):
        q = question_for(i)
        write_png(folder / "images" / f"{i}.png", q["colour"], q["shape"])
        record = {
            "id": f"q{i}",
            "image": f"images/{i}.png",
            "question": q["question"],
            "answer": q["choices"][q["answer"]],
            "type": q["kind"],
        }
        if with_choices:
            record["choices"] = q["choices"]
        lines.append(json.dumps(record))
        if i == 2:
            lines.append("")
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
