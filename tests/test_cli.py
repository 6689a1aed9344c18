"""The command line as a user meets it: help, defaults, errors, and each command on a tiny run."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from stabilizer.cli import main

QUICK = [
    "--max-steps", "4", "--batch-size", "4", "--max-train-samples", "32",
    "--max-eval-samples", "8", "--save-every", "2", "--lora-targets", "attention",
    "--rank", "4", "--real-images-only",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = CliRunner().invoke(main, ["train", *QUICK, "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir, result.output


def test_help_teaches_the_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "inspect", "eval", "predict"):
        assert command in result.output


def test_train_help_shows_defaults_and_choices():
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    out = " ".join(result.output.split())
    assert "tiny-instructblip-t5" in out and "easy-vqa" in out
    assert "fp32|bf16|fp16" in out
    assert "--adapter-dtype" in out and "classic failure" in out
    assert "--resume" in out and "--trace" in out
    assert "--on-warning [warn|raise]" in out and "nothing non-finite yet" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "--rank must be a positive integer, got 0"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lora-targets", "("], "--lora-targets '(' is neither a target set"),
        (["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such folder"),
        (["--model", "no-such-preset"], "no-such-preset"),
        (["--dataset", "/nonexistent/data"], "/nonexistent/data"),
    ],
)
def test_bad_options_fail_with_a_message_naming_them(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", *QUICK, "--run-dir", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_train_prints_the_scope_table_and_accuracy(trained_run):
    run_dir, output = trained_run
    assert "Trainable parameters" in output and "qformer" in output
    assert "Test accuracy" in output
    assert (run_dir / "eval.json").exists()


def test_resume_continues_with_more_steps(trained_run):
    run_dir, _ = trained_run
    result = CliRunner().invoke(
        main, ["train", "--resume", "--run-dir", str(run_dir), "--max-steps", "6", "--rank", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "step-00000004" in result.output
    assert "ignoring --rank" in result.output


def test_eval_scores_the_latest_checkpoint(trained_run):
    run_dir, _ = trained_run
    result = CliRunner().invoke(main, ["eval", str(run_dir), "--images", "real,blank"])
    assert result.exit_code == 0, result.output
    assert "real images" in result.output and "blank images" in result.output


def test_eval_rejects_unknown_image_mode(trained_run):
    run_dir, _ = trained_run
    result = CliRunner().invoke(main, ["eval", str(run_dir), "--images", "upside-down"])
    assert result.exit_code == 2 and "upside-down" in result.output


def test_predict_answers_with_choices_and_by_generation(trained_run, tmp_path):
    from PIL import Image

    run_dir, _ = trained_run
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    ranked = CliRunner().invoke(
        main,
        ["predict", str(run_dir), "--image", str(image), "--question", "what color is it?",
         "--choices", "red,blue"],
    )  # fmt: skip
    assert ranked.exit_code == 0, ranked.output
    assert "answer: " in ranked.output
    assert ranked.output.split("answer: ")[1].strip() in ("red", "blue")


def test_predict_names_a_missing_image(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = CliRunner().invoke(
        main, ["predict", str(run_dir), "--image", str(tmp_path / "none.png"), "--question", "q"]
    )
    assert result.exit_code == 2
    assert "none.png" in result.output


def test_eval_of_a_folder_without_run_says_so(tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "config.json" in result.output


def test_inspect_lists_target_sets_and_counts():
    result = CliRunner().invoke(main, ["inspect", "--model", "instructblip-flan-t5-xl-random"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "3,957,170,176" in out and "185,659,392" in out
    assert "2,420,736" in out  # LoRA r=8 on all 120 Q-Former Linear layers
    for target_set in ("attention", "ffn", "all", "paper", "name-list"):
        assert target_set in out
