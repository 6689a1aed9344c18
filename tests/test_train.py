"""The training loop end to end on tiny presets: resume exactness, crashes, bad data, fp16."""

from __future__ import annotations

import json
import math

import pytest
from data_fixtures import make_iconqa, make_jsonl, make_scienceqa
from faults import interrupt_at_batch
from rich.console import Console

from stabilizer.checkpoint import list_checkpoints
from stabilizer.config import TrainConfig
from stabilizer.errors import BadSampleError, ConfigError
from stabilizer.rundir import read_metrics
from stabilizer.train import train


def quick_config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig.smoke(overrides.pop("run_dir", tmp_path / "run"), **overrides)


def quiet() -> Console:
    return Console(record=True, width=120, force_terminal=False)


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = train(quick_config(tmp_path, run_dir=tmp_path / "straight"), console=quiet())
    assert len(straight.losses) == 8 and all(math.isfinite(x) for x in straight.losses)

    # Kill the second run while it builds the batch of step 6 (after the step-4 checkpoint).
    cfg = quick_config(tmp_path, run_dir=tmp_path / "resumed")
    interrupt_at_batch(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, console=quiet())
    monkeypatch.undo()

    # The crash lost nothing that was logged, and the step-4 checkpoint is complete.
    logged = train_losses(cfg.run_dir)
    assert sorted(logged) == [0, 1, 2, 3, 4, 5]
    assert [c.name for c in list_checkpoints(cfg.run_dir)] == ["step-00000004"]

    resumed = train(cfg, resume=True, console=quiet())
    assert resumed.start_step == 4
    expected = straight.losses[4:]
    assert resumed.losses == expected  # bit-exact on CPU fp32, step for step


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(quick_config(tmp_path), resume=True, console=quiet())


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    train(quick_config(tmp_path, max_steps=2, save_every=None), console=quiet())
    with pytest.raises(ConfigError, match="already holds a run"):
        train(quick_config(tmp_path, max_steps=2, save_every=None), console=quiet())


def test_run_folder_holds_config_metrics_checkpoints_and_eval(tmp_path):
    cfg = quick_config(tmp_path, max_steps=4, save_every=2, keep_last=1)
    result = train(cfg, console=quiet())
    run = cfg.run_dir
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4
    assert [c.name for c in list_checkpoints(run)] == ["step-00000004"]
    summary = json.loads((run / "eval.json").read_text())
    assert summary["results"]["real"]["count"] == 8
    assert 0.0 <= result.final_eval["real"].accuracy <= 1.0
    assert (run.parent / "latest").resolve() == run.resolve()


@pytest.mark.parametrize("model", ["tiny-instructblip-opt", "tiny-blip2-opt", "tiny-blip2-t5"])
def test_other_families_and_decoder_only_lms_train(tmp_path, model):
    result = train(
        quick_config(tmp_path, model=model, max_steps=3, save_every=None), console=quiet()
    )
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("maker", [make_scienceqa, make_iconqa])
def test_multiple_choice_datasets_train_and_rank_choices(tmp_path, maker):
    spec = maker(tmp_path, n_per_split=8)
    cfg = quick_config(
        tmp_path, dataset=str(spec), eval_split="val", max_steps=2, save_every=None, batch_size=4
    )
    result = train(cfg, console=quiet())
    assert result.final_eval["real"].count == 8


def test_missing_image_stops_training_naming_the_record(tmp_path):
    path = make_jsonl(tmp_path, n=8)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    (path.parent / records[2]["image"]).unlink()
    cfg = quick_config(tmp_path, dataset=str(path), train_split="x", eval_split="x", max_steps=1)
    with pytest.raises(BadSampleError) as err:
        train(cfg, console=quiet())
    assert "line 3" in str(err.value) and records[2]["image"] in str(err.value)
    assert "--on-bad-sample skip" in str(err.value)


def test_skip_policy_drops_and_counts_bad_samples(tmp_path):
    path = make_jsonl(tmp_path, n=8)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    (path.parent / records[2]["image"]).write_bytes(b"not a png")
    cfg = quick_config(
        tmp_path,
        dataset=str(path),
        train_split="x",
        eval_split="x",
        max_steps=1,
        save_every=None,
        on_bad_sample="skip",
    )
    console = quiet()
    result = train(cfg, console=console)
    assert result.skipped_bad_samples == 2  # once in the train split, once in eval
    assert "skipped 1 bad sample" in console.export_text()
    assert json.loads((cfg.run_dir / "eval.json").read_text())["skipped_bad_samples"] == 2


def test_answer_truncated_away_is_a_bad_sample(tmp_path):
    # A decoder-only LM has a fixed number of positions; an answer longer than what
    # the query tokens leave free would be cut off entirely, masking every label.
    path = make_jsonl(tmp_path, n=8, with_choices=False)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    record = json.loads(lines[0])
    record["answer"] = " ".join(["red"] * 300)
    lines[0] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    cfg = quick_config(
        tmp_path,
        model="tiny-instructblip-opt",
        dataset=str(path),
        train_split="x",
        eval_split="x",
        max_steps=1,
        max_answer_tokens=400,
    )
    with pytest.raises(BadSampleError) as err:
        train(cfg, console=quiet())
    message = str(err.value)
    assert "line 1" in message and "truncated away" in message
    assert "every label would be masked" in message


def test_classic_fp16_adapter_failure_is_reproduced_and_reported(tmp_path):
    cfg = quick_config(
        tmp_path, adapter_dtype="fp16", max_steps=3, save_every=None, max_eval_samples=4
    )
    console = quiet()
    result = train(cfg, console=console)
    # Step 0 is fine; the optimizer step of step 0 corrupts the fp16 adapters.
    assert math.isfinite(result.losses[0])
    assert all(math.isnan(x) for x in result.losses[1:])
    text = console.export_text()
    assert "reproducing the classic failure" in text
    assert "loss is not finite at step 1" in text
    # Named before step 0 by the preflight, with the detector's cause, and kept.
    assert text.index("fp16 under AdamW") < text.index("loss is not finite at step 1")
    saved = json.loads((result.run_dir / "preflight.json").read_text())
    assert [f["cause"] for f in saved["findings"] if f["level"] == "error"] == ["fp16-adam-eps"]


def test_gradient_checkpointing_of_the_lm_gives_the_same_losses(tmp_path):
    plain = train(
        quick_config(tmp_path, run_dir=tmp_path / "a", max_steps=3, save_every=None),
        console=quiet(),
    )
    checkpointed = train(
        quick_config(
            tmp_path,
            run_dir=tmp_path / "b",
            max_steps=3,
            save_every=None,
            gradient_checkpointing=True,
        ),
        console=quiet(),
    )
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)


def test_eval_every_and_checkpoints_every_epoch(tmp_path):
    # 16 samples in batches of 4: an epoch is 4 steps.
    cfg = quick_config(
        tmp_path,
        max_train_samples=16,
        max_steps=None,
        epochs=2,
        save_every=None,
        save_every_epochs=1,
        eval_every=2,
    )
    result = train(cfg, console=quiet())
    assert len(result.losses) == 8
    assert [c.name for c in list_checkpoints(cfg.run_dir)] == ["step-00000004", "step-00000008"]
    evals = [r["step"] for r in read_metrics(cfg.run_dir) if r["kind"] == "eval"]
    assert evals == [2, 4, 6, 8]


def test_grad_accumulation_and_schedules_run(tmp_path):
    for schedule in ("linear", "constant"):
        result = train(
            quick_config(
                tmp_path,
                run_dir=tmp_path / schedule,
                max_steps=3,
                grad_accum=2,
                schedule=schedule,
                save_every=None,
            ),
            console=quiet(),
        )
        assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)


def test_traced_run_resumes_into_the_same_store(tmp_path, monkeypatch):
    from stabilizer.store import TraceStore

    cfg = quick_config(tmp_path, trace=True, trace_every=2)
    interrupt_at_batch(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, console=quiet())
    monkeypatch.undo()
    with TraceStore.open(cfg.run_dir / "trace.db") as store:
        assert list(store.steps()["step"]) == [0, 1, 2, 3, 4, 5]  # committed before the kill

    train(cfg, resume=True, console=quiet())
    with TraceStore.open(cfg.run_dir / "trace.db") as store:
        steps = store.steps()
        assert list(steps["step"]) == list(range(8))  # 4 and 5 replaced, no duplicates
        assert list(steps["full"]) == [True, False] * 4
