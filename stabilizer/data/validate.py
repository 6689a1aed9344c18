"""Check samples before training so a bad record fails at start-up, not hours in.

>>> good, bad = check_samples(samples, on_bad_sample="skip")  # doctest: +SKIP
>>> print(f"skipped {len(bad)} bad samples")  # doctest: +SKIP

Every problem is a ``BadSampleError`` naming the sample's source (file and record);
image problems also name the image file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from stabilizer.data.sample import VQASample
from stabilizer.errors import BadSampleError, ConfigError

ON_BAD_SAMPLE_CHOICES = ("error", "skip")
FIX_HINT = "Fix or remove the record, or pass --on-bad-sample skip to leave it out"
# Modes whose alpha channel must be flattened rather than dropped (see _to_rgb).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# 16-bit grayscale (16-bit PNG and TIFF) in its byte orders.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Grayscale modes whose values have no fixed range: 32-bit integers and floats.
_WIDE_RANGE_MODES = frozenset({"I", "F"})
# How many choices an "answer not among choices" message lists before "and N more".
_CHOICES_SHOWN = 13


def check_limit(limit: int | None) -> None:
    """Reject a ``limit`` that is not ``None`` or a positive whole number.

    >>> check_limit(10)
    >>> check_limit(0)
    Traceback (most recent call last):
    ...
    stabilizer.errors.ConfigError: limit must be a positive whole number or None, got 0
    """
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive whole number or None, got {limit!r}")


def _wide_range_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Map ``I`` or ``F`` values onto 0..255; the mode says nothing of their range, so:

    - values already within 0..255 are kept (an 8-bit picture stored wide);
    - ``F`` values within 0..1 are scaled by 255 (the usual normalised float picture);
    - anything else has its own min..max stretched onto 0..255 (a 16-bit scan opened
      as ``I``, a depth map); a constant image becomes black.

    Non-finite floats count as 0.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return values * 255.0
    if low >= 0.0 and high <= 255.0:
        return values
    if high == low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """An ``L`` copy of a grayscale image with more than 8 bits per pixel.

    PIL's ``convert`` clips such values to 255 instead of scaling them, which makes a
    16-bit picture almost all white. 16-bit values are divided by 257 (65535 -> 255,
    the full range of the format); for ``I`` and ``F`` see :func:`_wide_range_to_8bit`.
    """
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        scaled = values.astype(np.float64) / 257.0
    else:
        scaled = _wide_range_to_8bit(values, image.mode)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB copy of ``image``.

    Transparent pixels are painted white: ScienceQA and IconQA figures are often
    RGBA PNGs whose transparent background stores black, and a plain
    ``convert("RGB")`` would turn them into black-on-black drawings. Grayscale with
    more than 8 bits per pixel is scaled to 8 bits first (see :func:`_to_8bit_gray`);
    its transparency, if any, is not kept.
    """
    # Camera photos (user JSONL data) store their rotation in EXIF, not in the pixels.
    image = ImageOps.exif_transpose(image) or image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in _WIDE_RANGE_MODES:
        image = _to_8bit_gray(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _missing(path: Path) -> str:
    return f"image {path} does not exist"


def _undecodable(path: Path, err: Exception) -> str:
    return f"image {path} cannot be decoded ({type(err).__name__}: {err})"


def _image_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot be used, or ``None`` when it decodes.

    The whole image is decoded (``load``), not only its header checked, because a
    truncated file passes ``open`` and would otherwise fail mid-training.
    """
    if not path.is_file():
        return _missing(path)
    try:
        with Image.open(path) as image:
            image.load()
    # PIL reports damaged files with many exception types (OSError, ValueError,
    # SyntaxError, struct.error, DecompressionBombError...); all mean "unusable".
    except Exception as err:
        return _undecodable(path, err)
    return None


def load_image(sample: VQASample, *, hint: str = FIX_HINT) -> Image.Image:
    """Open the sample's image as an RGB ``PIL.Image.Image``.

    >>> load_image(sample).mode  # doctest: +SKIP
    'RGB'

    A missing or undecodable file raises ``BadSampleError`` naming the sample's
    source and the image path, with ``hint`` saying what to do (the default names
    ``--on-bad-sample``, which only the commands that read a dataset have).
    """
    path = Path(sample.image_path)
    if not path.is_file():
        raise BadSampleError(sample.source, _missing(path), hint)
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except Exception as err:  # broad for the reason given in _image_problem
        raise BadSampleError(sample.source, _undecodable(path, err), hint) from err


def _text_problem(sample: VQASample) -> str | None:
    """What is wrong with the sample's prompt, answer or choices, or ``None``."""
    if not sample.prompt.strip():
        return "has an empty prompt"
    if not sample.answer.strip():
        return "has an empty answer"
    if sample.choices is None:
        return None
    if not sample.choices:
        return "has an empty list of choices"
    empty = [i for i, choice in enumerate(sample.choices) if not choice.strip()]
    if empty:
        # Ranking scores every choice, and an empty one has no token to score.
        return f"choice {empty[0] + 1} of its {len(sample.choices)} choices is empty"
    if sample.answer not in sample.choices:
        shown = ", ".join(repr(c) for c in sample.choices[:_CHOICES_SHOWN])
        more = len(sample.choices) - _CHOICES_SHOWN
        if more > 0:
            shown += f" and {more} more"
        return f"answer {sample.answer!r} is not one of its choices ({shown})"
    return None


def check_samples(
    samples: Iterable[VQASample], on_bad_sample: str = "error"
) -> tuple[list[VQASample], list[BadSampleError]]:
    """Check every sample's text and image; keep the good ones.

    >>> good, bad = check_samples(load_samples("easy-vqa", "test"), "skip")  # doctest: +SKIP

    With ``on_bad_sample="error"`` the first problem is raised (and ``bad`` is always
    empty). With ``"skip"`` the problems are returned for the caller to report: a
    skipped sample must never go unmentioned. Each image file is decoded once, however
    many questions share it (easy-vqa has ~10 questions per image).
    """
    if on_bad_sample not in ON_BAD_SAMPLE_CHOICES:
        raise ConfigError(
            f"--on-bad-sample must be one of {', '.join(ON_BAD_SAMPLE_CHOICES)}, "
            f"got {on_bad_sample!r}"
        )
    image_problems: dict[Path, str | None] = {}
    good: list[VQASample] = []
    bad: list[BadSampleError] = []
    for sample in samples:
        problem = _text_problem(sample)
        if problem is None:
            path = Path(sample.image_path)
            if path not in image_problems:
                image_problems[path] = _image_problem(path)
            problem = image_problems[path]
        if problem is None:
            good.append(sample)
            continue
        error = BadSampleError(sample.source, problem, FIX_HINT)
        if on_bad_sample == "error":
            raise error
        bad.append(error)
    return good, bad
