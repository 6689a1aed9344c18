"""Bad files from strangers: each is a clear error at the CLI, never a traceback, never unpickled.

One table, to grow with each new input class. A case damages a copy of a good input
(the repro bundle and trace store of a tiny traced run that hits the classic fp16
NaN at step 0, or a tiny saved model folder), names the command to run on it, and
the exit code and the message fragments expected on stderr: the file, the field,
and what to do.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_train import quick_config, quiet

from stabilizer.cli import main
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.models.presets import build_preset
from stabilizer.train import train

ROOT = Path(__file__).resolve().parents[1]
DROP = object()  # a manifest_edit value: remove the field


@dataclass(frozen=True)
class Inputs:
    """The good inputs every case starts from (never damaged in place)."""

    run: Path  # a traced run folder: trace.db, config.json, repro/step-00000000/
    bundle: Path
    model: Path  # a tiny InstructBLIP folder written by save_pretrained


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("good")
    cfg = quick_config(
        root,
        adapter_dtype="fp16",  # the classic failure: a NaN at step 0, so a bundle
        trace=True,
        max_steps=1,
        save_every=None,
        max_eval_samples=4,
    )
    with pytest.raises(NumericalAnomalyError):
        train(cfg, console=quiet())
    model, processor = build_preset("tiny-instructblip-t5", seed=5)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return Inputs(cfg.run_dir, cfg.run_dir / "repro" / "step-00000000", root / "model")


@pytest.fixture(autouse=True)
def nothing_is_unpickled(monkeypatch):
    """Whatever a case feeds in, no code path may unpickle it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a file was unpickled")

    for module, name in ((torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(module, name, refuse)
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)


# -- how a bad input is made: each maker copies a good input, damages it, returns the args

Maker = Callable[[Inputs, Path], list[str]]
Damage = Callable[[Path], None]


def bad_bundle(damage: Damage) -> Maker:
    def make(inputs: Inputs, tmp: Path) -> list[str]:
        bundle = tmp / "bundle"
        shutil.copytree(inputs.bundle, bundle)
        damage(bundle)
        return ["replay", str(bundle)]

    return make


def bad_store(damage: Damage) -> Maker:
    def make(inputs: Inputs, tmp: Path) -> list[str]:
        run = tmp / "run"
        shutil.copytree(inputs.run, run, ignore=shutil.ignore_patterns("repro", "report*"))
        damage(run)
        return ["report", str(run)]

    return make


def bundle_naming_model(damage: Damage) -> Maker:
    """A bundle whose config names a copy of the tiny model folder, damaged."""

    def make(inputs: Inputs, tmp: Path) -> list[str]:
        folder = _damaged_model(inputs, tmp, damage)
        return bad_bundle(manifest_edit(config=_config(inputs, model=str(folder))))(inputs, tmp)

    return make


def run_config_naming_model(damage: Damage) -> Maker:
    """A run folder (config.json and a checkpoint) whose config names a damaged model."""

    def make(inputs: Inputs, tmp: Path) -> list[str]:
        folder = _damaged_model(inputs, tmp, damage)
        run = tmp / "run"
        shutil.copytree(inputs.bundle / "checkpoints", run / "checkpoints")
        (run / "config.json").write_text(json.dumps(_config(inputs, model=str(folder))))
        return ["eval", str(run)]

    return make


def _damaged_model(inputs: Inputs, tmp: Path, damage: Damage) -> Path:
    folder = tmp / "model"
    shutil.copytree(inputs.model, folder)
    damage(folder)
    return folder


def _config(inputs: Inputs, **changes) -> dict:
    return {**json.loads((inputs.bundle / "bundle.json").read_text())["config"], **changes}


# -- damages


def manifest_edit(**changes) -> Damage:
    def damage(bundle: Path) -> None:
        data = json.loads((bundle / "bundle.json").read_text())
        for key, value in changes.items():
            if value is DROP:
                del data[key]
            else:
                data[key] = value
        (bundle / "bundle.json").write_text(json.dumps(data))

    return damage


def write(name: str, content: str | bytes) -> Damage:
    def damage(folder: Path) -> None:
        path = folder / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    return damage


def remove(name: str) -> Damage:
    return lambda folder: (folder / name).unlink()


def truncate(name: str, keep: float) -> Damage:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def overwrite(name: str, start: float, end: float) -> Damage:
    """Garbage over bytes [start, end) of the file, as fractions of its size."""

    def damage(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        lo, hi = int(len(data) * start), int(len(data) * end)
        data[lo:hi] = bytes((i * 37 + 11) % 256 for i in range(hi - lo))
        (folder / name).write_bytes(bytes(data))

    return damage


def batch_edit(edit: Callable[[dict], None]) -> Damage:
    def damage(bundle: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(bundle / "batch.safetensors"))
        edit(tensors)
        save_file(tensors, str(bundle / "batch.safetensors"))

    return damage


def empty_sqlite(folder: Path) -> None:
    (folder / "trace.db").unlink()
    with sqlite3.connect(folder / "trace.db") as conn:
        conn.execute("CREATE TABLE scratch (x)")
        conn.execute("DROP TABLE scratch")  # a valid database, with no table left
    conn.close()


def make_dir(name: str) -> Damage:
    return lambda folder: (folder / name).mkdir()


def pickle_weights(name: str) -> Damage:
    """Swap model.safetensors for the same weights saved by torch.save (a pickle)."""

    def damage(folder: Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"))
        torch.save(weights, folder / name)
        (folder / "model.safetensors").unlink()

    return damage


def config_names_weights(name: str) -> Damage:
    """config.json's transformers_weights names a pickle beside model.safetensors."""

    def damage(folder: Path) -> None:
        torch.save({"x": torch.zeros(1)}, folder / name)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": name}))

    return damage


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(key, value)


def _poke(key: str, value: int) -> Callable[[dict], None]:
    return lambda tensors: tensors[key].view(-1).__setitem__(-1, value)


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    make: Maker
    exit_code: int
    fragments: tuple[str, ...]


REMAKE = "make a new bundle with `stabilizer train --trace`"
DAMAGED = ("trace.db is a damaged stabilizer trace store", "checkpoints", "--resume", ".recover")

CASES = {
    # stabilizer replay BUNDLE
    "bundle.json without config": Case(
        bad_bundle(manifest_edit(config=DROP)),
        2,
        ("bundle.json: field 'config' is missing", REMAKE),
    ),
    "bundle.json without anomaly": Case(
        bad_bundle(manifest_edit(anomaly=DROP)), 2, ("bundle.json: field 'anomaly' is missing",)
    ),
    "bundle.json with a config that is not an object": Case(
        bad_bundle(manifest_edit(config="tiny")), 2, ("field 'config' must be a JSON object",)
    ),
    "bundle.json that is not JSON": Case(
        bad_bundle(write("bundle.json", '{"format": "stabilizer-repro", ')),
        2,
        ("bundle.json: not valid JSON", REMAKE),
    ),
    "bundle.json that is binary": Case(
        bad_bundle(write("bundle.json", b"\xff\xfe\x00\x81garbage")),
        2,
        ("bundle.json: not valid JSON (not UTF-8 text",),
    ),
    "bundle.json that is a JSON list": Case(
        bad_bundle(write("bundle.json", "[1, 2]")),
        2,
        ("bundle.json: not a stabilizer repro bundle", "runs/<name>/repro/step-N"),
    ),
    "micro_batches 0": Case(
        bad_bundle(manifest_edit(micro_batches=0)),
        2,
        ("field 'micro_batches' must be a whole number from 1", "not 0"),
    ),
    "micro_batches larger than the batch": Case(
        bad_bundle(manifest_edit(micro_batches=5)),
        2,
        ("field 'micro_batches' is 5", "batch.safetensors holds 1 micro-batch(es)", "set it to 1"),
    ),
    "a step of 1e99": Case(
        bad_bundle(manifest_edit(step=1e99)),
        2,
        ("field 'step' must be a whole number from 0 to 2**63-1, not 1e+99",),
    ),
    "a step its checkpoint is not of": Case(
        bad_bundle(manifest_edit(step=5)),
        2,
        ("field 'step' is 5", "step-00000000 holds the state before step 0"),
    ),
    "batch.safetensors missing": Case(
        bad_bundle(remove("batch.safetensors")), 2, ("batch.safetensors: missing", REMAKE)
    ),
    "batch.safetensors truncated": Case(
        bad_bundle(truncate("batch.safetensors", keep=0.5)),
        2,
        ("batch.safetensors: not a readable safetensors file, truncated or damaged", REMAKE),
    ),
    "pixel values of the wrong shape": Case(
        bad_bundle(batch_edit(_set("0.pixel_values", torch.zeros(4, 3, 32)))),
        2,
        ("batch.safetensors, micro-batch 0: pixel_values", "[4, 3, 32]", "[batch, 3, 64, 64]"),
    ),
    "input ids outside the vocabulary": Case(
        bad_bundle(batch_edit(_poke("0.input_ids", 10**6))),
        2,
        ("micro-batch 0: input_ids holds ids from", "to 1000000, outside", "vocabulary"),
    ),
    # stabilizer report RUN
    "trace.db with garbage mid-file": Case(
        bad_store(overwrite("trace.db", 0.3, 0.7)), 2, (*DAMAGED, "malformed")
    ),
    "trace.db truncated": Case(
        bad_store(truncate("trace.db", keep=0.5)), 2, (*DAMAGED, "truncated: ")
    ),
    "trace.db truncated to 0 bytes": Case(
        bad_store(truncate("trace.db", keep=0)), 2, (*DAMAGED, "empty (0 bytes)")
    ),
    "trace.db whose SQLite header is overwritten": Case(
        bad_store(overwrite("trace.db", 0, 0.001)), 2, (*DAMAGED, "header is overwritten")
    ),
    "trace.db with no tables": Case(
        bad_store(empty_sqlite),
        2,
        ("trace.db is an SQLite file with no tables, not a stabilizer trace store",),
    ),
    "trace.db that is not SQLite at all": Case(
        bad_store(write("trace.db", "step,loss\n0,nan\n" * 50)),
        2,
        ("trace.db is not a stabilizer trace store: it is not an SQLite file",),
    ),
    "report/ is a file": Case(
        bad_store(write("report", "not a folder")),
        2,
        ("report is a file", "move or delete that file"),
    ),
    "report.html is a folder": Case(
        bad_store(make_dir("report.html")), 2, ("report.html is a folder", "move or delete")
    ),
    # a local model folder named by bundle.json / config.json
    "bundle's model folder holds pytorch_model.bin": Case(
        bundle_naming_model(pickle_weights("pytorch_model.bin")),
        2,
        (
            "its weights are a pickle (pytorch_model.bin)",
            "loads safetensors only",
            "where you trust pytorch_model.bin",
            "use_safetensors=False).save_pretrained(",
        ),
    ),
    "bundle's model folder holds a .pt": Case(
        bundle_naming_model(pickle_weights("weights.pt")),
        2,
        (
            "bundle.json, config field 'model'",
            "its weights are a pickle (weights.pt)",
            "m.save_pretrained(",
        ),
    ),
    "bundle's model config names a pickle to load": Case(
        bundle_naming_model(config_names_weights("adapter_model.bin")),
        2,
        ("config.json field 'transformers_weights' names 'adapter_model.bin'",),
    ),
    "run's model folder holds pytorch_model.bin": Case(
        run_config_naming_model(pickle_weights("pytorch_model.bin")),
        2,
        ("its weights are a pickle (pytorch_model.bin)", "loads safetensors only"),
    ),
    "run's model folder has no weights": Case(
        run_config_naming_model(remove("model.safetensors")),
        2,
        ("the folder holds no model.safetensors",),
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=name) for name, c in CASES.items()])
def test_a_bad_input_is_a_clear_error(case: Case, inputs: Inputs, tmp_path: Path):
    args = case.make(inputs, tmp_path)
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, SystemExit), result.exception  # no other exception
    assert result.exit_code == case.exit_code, result.output
    message = " ".join(result.stderr.split())
    assert message.startswith("error: "), message
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in result.output


def test_no_code_calls_torch_load_without_weights_only():
    """A static guard: a torch.load anywhere in the shipped code must pass weights_only=True."""
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("stabilizer", "scripts", "benchmarks", "examples")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in _unsafe_torch_loads(path)
    ]
    assert offenders == []


def _unsafe_torch_loads(path: Path) -> list[int]:
    """Lines of ``torch.load(...)`` / ``torch.serialization.load(...)`` calls in ``path``
    that do not pass ``weights_only=True``."""
    lines = []
    for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        func = getattr(call, "func", None)
        is_load = (
            isinstance(call, ast.Call)
            and isinstance(func, ast.Attribute)
            and func.attr == "load"
            and ast.unparse(func.value) in ("torch", "torch.serialization")
        )
        if is_load and not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        ):
            lines.append(call.lineno)
    return lines
