"""Load easy-vqa, the small synthetic dataset shipped as the ``easy_vqa`` PyPI package.

Each image is a 64x64 picture of one coloured shape; each question has one of 13
answers (8 colours, 3 shapes, yes/no). It needs no download, which makes it the
default dataset for quick runs and tests.
"""

from __future__ import annotations

from pathlib import Path

import easy_vqa

from stabilizer.data.sample import VQASample
from stabilizer.data.validate import check_limit
from stabilizer.errors import ConfigError

SPLITS = ("train", "test")
SHAPES = frozenset({"circle", "rectangle", "triangle"})
YES_NO = frozenset({"yes", "no"})
COLOURS = frozenset({"black", "blue", "brown", "gray", "green", "red", "teal", "yellow"})


def question_type_of(answer: str) -> str:
    """The breakdown type of an easy-vqa answer.

    >>> question_type_of("teal"), question_type_of("circle"), question_type_of("no")
    ('colour', 'shape', 'yes/no')
    """
    if answer in COLOURS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    if answer in YES_NO:
        return "yes/no"
    return "all"


def _read_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """Questions, answers, image ids and the id -> image path map of one split."""
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        return questions, answers, image_ids, easy_vqa.get_train_image_paths()
    questions, answers, image_ids = easy_vqa.get_test_questions()
    return questions, answers, image_ids, easy_vqa.get_test_image_paths()


def _image_path(paths: dict[int, str], split: str, image_id: int) -> Path:
    """The image file of ``image_id``.

    An id absent from the package's listing gets the path the file would have, so
    that ``check_samples`` reports it as a missing image instead of the load failing.
    """
    if image_id in paths:
        return Path(paths[image_id])
    return Path(easy_vqa.__file__).parent / "data" / split / "images" / f"{image_id}.png"


def load_easy_vqa(split: str = "train", limit: int | None = None) -> list[VQASample]:
    """Load one easy-vqa split in the package's question order.

    >>> samples = load_easy_vqa("test", limit=2)
    >>> samples[0].sample_id, samples[0].source
    ('easy-vqa/test/0', 'easy-vqa test question 0')
    >>> len(samples[0].choices)
    13

    ``choices`` is always all 13 answers, sorted: easy-vqa is a closed answer set,
    scored by ranking the 13 candidates. ``limit`` keeps the first ``limit`` questions.
    """
    if split not in SPLITS:
        raise ConfigError(f"easy-vqa has no split {split!r}; its splits are {', '.join(SPLITS)}")
    check_limit(limit)
    questions, answers, image_ids, paths = _read_split(split)
    choices = tuple(sorted(a.strip() for a in easy_vqa.get_answers()))
    count = len(questions) if limit is None else min(limit, len(questions))
    return [
        VQASample(
            sample_id=f"easy-vqa/{split}/{index}",
            source=f"easy-vqa {split} question {index}",
            image_path=_image_path(paths, split, image_ids[index]),
            prompt=questions[index].strip(),
            answer=answers[index].strip(),
            choices=choices,
            question_type=question_type_of(answers[index].strip()),
            extra={"image_id": image_ids[index]},
        )
        for index in range(count)
    ]
