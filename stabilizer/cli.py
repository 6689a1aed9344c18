"""The ``stabilizer`` command line. Each command maps its options onto a config dataclass.

stabilizer train                         # the embedded default: tiny InstructBLIP on easy-vqa
stabilizer train --adapter-dtype fp16    # reproduce the classic NaN failure on purpose
stabilizer inspect --model tiny-instructblip-t5
stabilizer eval runs/latest
stabilizer predict runs/latest --image cat.png --question "what colour is the shape?"
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from stabilizer.config import (
    ADAPTER_DTYPES,
    ANOMALY_POLICIES,
    BAD_SAMPLE_POLICIES,
    DEVICES,
    JUDGE_LATE_MODES,
    PRECISIONS,
    PREFLIGHT_MODES,
    SCHEDULES,
    WARNING_POLICIES,
    TrainConfig,
    field_help,
)
from stabilizer.detector.policy import NumericalAnomalyError
from stabilizer.errors import ConfigError, StabilizerError
from stabilizer.models.lora import TARGET_SETS, LoraSettings
from stabilizer.models.presets import PRESETS

_DEFAULTS = TrainConfig()
_LORA_DEFAULTS = LoraSettings()


class _OptionalFloat(click.ParamType):
    """A float, or ``none`` to switch the feature off."""

    name = "FLOAT|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        # One rule: "none" switches it off; 0 and negatives are refused by the config
        # (a 0 that silently disabled clipping while -1 was an error was two rules).
        if str(value).lower() in ("none", "off"):
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'none'", param, ctx)


def _h(name: str) -> str:
    return field_help(TrainConfig, name)


def _lh(name: str) -> str:
    return field_help(LoraSettings, name)


def _train_options(func):
    """Options of ``train``; defaults come from TrainConfig (one place holds each)."""
    d, ld = _DEFAULTS, _LORA_DEFAULTS
    options = [
        click.option(
            "--model",
            default=d.model,
            show_default=True,
            help=_h("model") + "; presets: " + ", ".join(PRESETS),
        ),
        click.option("--dataset", default=d.dataset, show_default=True, help=_h("dataset")),
        click.option("--train-split", default=d.train_split, show_default=True),
        click.option("--eval-split", default=d.eval_split, show_default=True),
        click.option("--max-train-samples", type=int, help=_h("max_train_samples")),
        click.option(
            "--max-eval-samples",
            type=int,
            default=d.max_eval_samples,
            show_default=True,
            help=_h("max_eval_samples"),
        ),
        click.option(
            "--max-steps", type=int, default=d.max_steps, show_default=True, help=_h("max_steps")
        ),
        click.option("--epochs", type=float, help=_h("epochs") + " (ignores --max-steps' default)"),
        click.option(
            "--batch-size", type=int, default=d.batch_size, show_default=True, help=_h("batch_size")
        ),
        click.option(
            "--grad-accum", type=int, default=d.grad_accum, show_default=True, help=_h("grad_accum")
        ),
        click.option("--lr", type=float, default=d.lr, show_default=True, help=_h("lr")),
        click.option(
            "--weight-decay",
            type=float,
            default=d.weight_decay,
            show_default=True,
            help=_h("weight_decay"),
        ),
        click.option(
            "--adam-eps", type=float, default=d.adam_eps, show_default=True, help=_h("adam_eps")
        ),
        click.option(
            "--warmup-steps",
            type=int,
            default=d.warmup_steps,
            show_default=True,
            help=_h("warmup_steps"),
        ),
        click.option(
            "--schedule",
            type=click.Choice(SCHEDULES),
            default=d.schedule,
            show_default=True,
            help=_h("schedule"),
        ),
        click.option(
            "--max-grad-norm",
            type=_OptionalFloat(),
            default=d.max_grad_norm,
            show_default=True,
            help=_h("max_grad_norm"),
        ),
        click.option(
            "--lora-targets",
            default=ld.targets,
            show_default=True,
            help=f"{_lh('targets')}: {', '.join(TARGET_SETS)} or a regex "
            "(see `stabilizer inspect`)",
        ),
        click.option("--rank", type=int, default=ld.rank, show_default=True, help=_lh("rank")),
        click.option(
            "--lora-alpha", type=float, default=ld.alpha, show_default=True, help=_lh("alpha")
        ),
        click.option(
            "--lora-dropout",
            type=float,
            default=ld.dropout,
            show_default=True,
            help=_lh("dropout"),
        ),
        click.option(
            "--train-query-tokens/--freeze-query-tokens",
            default=ld.train_query_tokens,
            show_default=True,
            help=_lh("train_query_tokens"),
        ),
        click.option(
            "--train-projection/--freeze-projection",
            default=ld.train_projection,
            show_default=True,
            help=_lh("train_projection"),
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default=d.precision,
            show_default=True,
            help=_h("precision"),
        ),
        click.option(
            "--adapter-dtype",
            type=click.Choice(ADAPTER_DTYPES),
            default=d.adapter_dtype,
            show_default=True,
            help=_h("adapter_dtype"),
        ),
        click.option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            default=d.gradient_checkpointing,
            show_default=True,
            help=_h("gradient_checkpointing"),
        ),
        click.option("--seed", type=int, default=d.seed, show_default=True, help=_h("seed")),
        click.option(
            "--device",
            type=click.Choice(DEVICES),
            default=d.device,
            show_default=True,
            help=_h("device"),
        ),
        click.option("--eval-every", type=int, help=_h("eval_every")),
        click.option(
            "--eval-batch-size",
            type=int,
            default=d.eval_batch_size,
            show_default=True,
            help=_h("eval_batch_size"),
        ),
        click.option(
            "--save-every",
            type=int,
            default=d.save_every,
            show_default=True,
            help=_h("save_every"),
        ),
        click.option("--save-every-epochs", type=int, help=_h("save_every_epochs")),
        click.option(
            "--keep-last", type=int, default=d.keep_last, show_default=True, help=_h("keep_last")
        ),
        click.option(
            "--log-every", type=int, default=d.log_every, show_default=True, help=_h("log_every")
        ),
        click.option(
            "--on-bad-sample",
            type=click.Choice(BAD_SAMPLE_POLICIES),
            default=d.on_bad_sample,
            show_default=True,
            help=_h("on_bad_sample"),
        ),
        click.option(
            "--max-prompt-tokens",
            type=int,
            default=d.max_prompt_tokens,
            show_default=True,
            help=_h("max_prompt_tokens"),
        ),
        click.option(
            "--max-answer-tokens",
            type=int,
            default=d.max_answer_tokens,
            show_default=True,
            help=_h("max_answer_tokens"),
        ),
        click.option(
            "--blank-and-shuffled-eval/--real-images-only",
            default=d.blank_and_shuffled_eval,
            show_default=True,
            help=_h("blank_and_shuffled_eval"),
        ),
        click.option("--run-dir", type=click.Path(path_type=Path), help=_h("run_dir")),
        click.option("--run-name", help=_h("run_name")),
        click.option(
            "--resume",
            is_flag=True,
            help="continue the run in --run-dir (default runs/latest) from its last checkpoint, "
            "with its saved config; only --max-steps/--epochs may change (a new horizon "
            "rebuilds the learning-rate schedule, and says so)",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="start afresh in a run folder that already holds a run: its files are "
            "deleted first",
        ),
        click.option("--trace", is_flag=True, help=_h("trace")),
        click.option(
            "--trace-every",
            type=int,
            default=d.trace_every,
            show_default=True,
            help=_h("trace_every"),
        ),
        click.option("--probe", help=_h("probe")),
        click.option(
            "--compile-stats/--eager-stats",
            default=d.compile_stats,
            show_default=True,
            help=_h("compile_stats"),
        ),
        click.option(
            "--on-anomaly",
            type=click.Choice(ANOMALY_POLICIES),
            default=d.on_anomaly,
            show_default=True,
            help=_h("on_anomaly"),
        ),
        click.option(
            "--on-warning",
            type=click.Choice(WARNING_POLICIES),
            default=d.on_warning,
            show_default=True,
            help=_h("on_warning"),
        ),
        click.option(
            "--judge-late",
            type=click.Choice(JUDGE_LATE_MODES),
            default=d.judge_late,
            show_default=True,
            help=_h("judge_late"),
        ),
        click.option(
            "--preflight",
            type=click.Choice(PREFLIGHT_MODES),
            default=d.preflight,
            show_default=True,
            help=_h("preflight"),
        ),
        click.option(
            "--max-repairs",
            type=int,
            default=d.max_repairs,
            show_default=True,
            help=_h("max_repairs"),
        ),
        click.option(
            "--max-anomalies",
            type=int,
            default=d.max_anomalies,
            show_default=True,
            help=_h("max_anomalies"),
        ),
        click.option(
            "--rollback-lr-factor",
            type=float,
            default=d.rollback_lr_factor,
            show_default=True,
            help=_h("rollback_lr_factor"),
        ),
        click.option(
            "--replay/--no-replay", default=d.replay, show_default=True, help=_h("replay")
        ),
        click.option("--tensorboard", is_flag=True, default=False, help=_h("tensorboard")),
        click.option("--wandb", is_flag=True, default=False, help=_h("wandb")),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _new_config(ctx: click.Context, options: dict) -> TrainConfig:
    """The TrainConfig of a new run from the train options (``train`` and ``check``)."""
    lora = LoraSettings(**{_LORA_KEYS[k]: options.pop(k) for k in list(_LORA_KEYS)})
    epochs_only = (
        ctx.get_parameter_source("epochs") == click.core.ParameterSource.COMMANDLINE
        and ctx.get_parameter_source("max_steps") != click.core.ParameterSource.COMMANDLINE
    )
    if epochs_only:
        options["max_steps"] = None  # --epochs alone: the epochs decide the end
    return TrainConfig(lora=lora, **options)


def make_console():
    """A rich console; when output is not a terminal (CI logs, files) tables get 120 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _fail(err: Exception) -> None:
    click.secho(f"error: {err}", fg="red", err=True)
    sys.exit(2)


@click.group(
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
        "terminal_width": 100,
    }
)
@click.version_option(package_name="stabilizer")
def main() -> None:
    """Find where and why NaN/Inf appears when fine-tuning the Q-Former of
    InstructBLIP or BLIP-2 with LoRA.

    \b
    Start here:
      stabilizer train                        train the embedded default (about 4 minutes on CPU)
      stabilizer inspect                      see which Q-Former layers LoRA would touch
      stabilizer eval runs/latest             score the last run (real, blank, shuffled images)
      stabilizer train --adapter-dtype fp16 --trace
                                              reproduce the classic fp16 NaN failure and see
                                              where and why it starts
      stabilizer check --adapter-dtype fp16   the same failure named before step 0 (exit 1)
      stabilizer train --adapter-dtype fp16 --trace --on-anomaly repair
                                              repair it at step 0 and train to the end
      stabilizer report runs/latest           the HTML report of a traced run
      stabilizer replay runs/<name>/repro/step-00000000
                                              re-run a saved anomalous step
    """


_LORA_KEYS = {
    "lora_targets": "targets",
    "rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "train_query_tokens": "train_query_tokens",
    "train_projection": "train_projection",
}


@main.command()
@_train_options
@click.pass_context
def train(ctx: click.Context, resume: bool, overwrite: bool, **options) -> None:
    """Train LoRA adapters on the Q-Former and evaluate them.

    With no options this runs the embedded default: the tiny InstructBLIP preset
    (random weights, built from config) on easy-vqa for 2,500 steps, then scores the
    test split with real, blank and shuffled images next to the majority answer.

    \b
    Examples:
      stabilizer train --max-steps 200 --run-name quick
      stabilizer train --model Salesforce/instructblip-flan-t5-xl --precision bf16 \\
          --dataset /data/ScienceQA --epochs 3 --lora-targets paper
      stabilizer train --run-dir runs/quick --resume --max-steps 400
      torchrun --nproc_per_node 2 -m stabilizer train --trace --batch-size 16
          (DDP: --batch-size is per rank; ranks agree on every anomaly action)
    """
    from stabilizer.rundir import load_run_config
    from stabilizer.train import train as run_training

    def explicit(name: str) -> bool:
        return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE

    try:
        if resume and overwrite:
            raise ConfigError("--resume continues a run and --overwrite deletes it: pass one")
        if resume:
            run_dir = options["run_dir"] or Path("runs/latest")
            cfg = load_run_config(run_dir)
            changes = {"run_dir": run_dir.resolve() if run_dir.is_symlink() else run_dir}
            if explicit("max_steps"):
                changes["max_steps"] = options["max_steps"]
            if explicit("epochs"):
                changes["epochs"] = options["epochs"]
                changes.setdefault("max_steps", None)
            ignored = [
                name
                for name in options
                if explicit(name) and name not in ("max_steps", "epochs", "run_dir")
            ]
            if ignored:
                click.secho(
                    "note: --resume uses the run's saved config; ignoring "
                    + ", ".join("--" + n.replace("_", "-") for n in ignored),
                    fg="yellow",
                    err=True,
                )
            cfg = TrainConfig.from_dict({**cfg.to_dict(), **changes})
        else:
            cfg = _new_config(ctx, options)
        run_training(cfg, resume=resume, overwrite=overwrite, console=make_console())
    except NumericalAnomalyError as err:
        # The diagnosis card was printed when it happened; end with where to look.
        click.secho(
            f"stopped: NaN/Inf at step {err.anomaly.step} ({err.anomaly.cause}); "
            "the trace store and repro bundle are in the run folder",
            fg="red",
            err=True,
        )
        sys.exit(3)
    except StabilizerError as err:
        _fail(err)


@main.command(name="check")
@_train_options
@click.pass_context
def check_command(ctx: click.Context, resume: bool, overwrite: bool, **options) -> None:
    """Predict the NaN before step 0: the preflight checks of `train`, without training.

    Takes the options of `train`, builds the same model, LoRA, optimizer, scaler and
    first batches, and prints one table: the dtype of every component and of the
    trainable tensors, and each check (fp16 tensors under Adam and its eps, GradScaler
    with fp16 gradients, bf16 updates below resolution, LoRA scope, gradient
    checkpointing, the first batches' labels/masks/pixels, quantization) with its fix.
    Nothing is written. Exit status 1 when a check finds an error, 0 otherwise.

    \b
    Examples:
      stabilizer check                          # the default run: exits 0
      stabilizer check --adapter-dtype fp16     # the classic failure, named: exits 1
      stabilizer check --model ./my-blip2 --precision fp16 --dataset ./data
    """
    from stabilizer.train import check as run_check

    if resume or overwrite:
        flag = "--resume" if resume else "--overwrite"
        _fail(StabilizerError(f"stabilizer check: {flag} does not apply (nothing is trained)"))

    try:
        report = run_check(_new_config(ctx, options), console=make_console())
    except StabilizerError as err:
        _fail(err)
    if report.errors:
        click.secho(
            f"preflight: {len(report.errors)} error(s); this configuration fails "
            "(see the fix column)",
            fg="red",
            err=True,
        )
        sys.exit(1)
    click.secho(
        f"preflight: no error ({len(report.warnings)} warning(s)); ready to train", fg="green"
    )


@main.command()
@click.option("--model", default=_DEFAULTS.model, show_default=True, help=_h("model"))
@click.option(
    "--rank",
    type=int,
    default=_LORA_DEFAULTS.rank,
    show_default=True,
    help="rank used for the parameter counts",
)
@click.option("--lora-targets", default=None, help="also show what this target set or regex hits")
def inspect(model: str, rank: int, lora_targets: str | None) -> None:
    """Show the Q-Former's modules, which ones each LoRA target set hits, and the counts.

    Nothing is trained. Presets are built on the meta device, so even the
    real-size ones are shown instantly.
    """
    from stabilizer.inspect_model import inspect_model

    try:
        inspect_model(model, rank=rank, extra_targets=lora_targets, console=make_console())
    except StabilizerError as err:
        _fail(err)


@main.command(name="eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="checkpoint folder (default: the run's latest)",
)
@click.option("--split", help="split to score (default: the run's eval split)")
@click.option("--max-samples", type=int, help="score the first N samples (default: the run's)")
@click.option(
    "--images",
    default="real,blank,shuffled",
    show_default=True,
    help="comma-separated image modes: real, blank, shuffled",
)
@click.option("--device", type=click.Choice(DEVICES), default=None)
def eval_command(run_dir, checkpoint, split, max_samples, images, device) -> None:
    """Score a run's checkpoint: accuracy by question type, with real, blank and shuffled images."""
    from rich.markup import escape

    from stabilizer.evaluate import IMAGE_MODES
    from stabilizer.inference import restore_run
    from stabilizer.train import accuracy_table, load_checked_samples, majority_baseline, run_eval

    console = make_console()
    modes = [m.strip() for m in images.split(",") if m.strip()]
    bad = [m for m in modes if m not in IMAGE_MODES]
    if bad or not modes:
        _fail(ValueError(f"--images: unknown mode(s) {bad}; use {', '.join(IMAGE_MODES)}"))
    try:
        run = restore_run(run_dir, checkpoint=checkpoint, device=device)
        cfg = run.cfg
        split = split or cfg.eval_split
        limit = max_samples if max_samples is not None else cfg.max_eval_samples
        samples, _ = load_checked_samples(cfg, split, limit, run.encoder, console)
        console.print(
            f"scoring {len(samples):,} samples of '{escape(split)}' with "
            f"{escape(str(run.checkpoint))}"
        )
        results = run_eval(run.model, run.encoder, samples, cfg, run.device, run.plan, modes)
        train_samples, _ = load_checked_samples(
            cfg, cfg.train_split, cfg.max_train_samples, run.encoder, console
        )
        console.print(accuracy_table(results, majority_baseline(train_samples, samples)))
    except StabilizerError as err:
        _fail(err)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--image", "image_path", required=True, type=click.Path(path_type=Path), help="image file"
)
@click.option("--question", required=True, help="the question to ask")
@click.option(
    "--choices", help="comma-separated candidate answers: rank them instead of generating"
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="checkpoint folder (default: the run's latest)",
)
@click.option("--device", type=click.Choice(DEVICES), default=None)
def predict(run_dir, image_path, question, choices, checkpoint, device) -> None:
    """Answer one question about one image with a trained run."""
    import torch

    from stabilizer.data.jsonl import format_prompt
    from stabilizer.data.sample import VQASample
    from stabilizer.data.validate import load_image
    from stabilizer.evaluate import generate_answers, sequence_nll
    from stabilizer.inference import restore_run

    try:
        options = tuple(c.strip() for c in choices.split(",")) if choices else None
        if options is not None and not all(options):
            raise ConfigError(
                f"--choices {choices!r} has an empty choice; give non-empty answers separated "
                "by commas, e.g. --choices red,blue"
            )
        run = restore_run(run_dir, checkpoint=checkpoint, device=device)
        if options is None and run.cfg.dataset in ("easy-vqa", "easy_vqa", "easyvqa"):
            # easy-vqa is a closed answer set, and the run was scored by ranking it.
            import easy_vqa

            options = tuple(sorted(easy_vqa.get_answers()))
        prompt = format_prompt(question, options) if options else question
        sample = VQASample(
            "predict/0",
            f"--image {image_path}",
            Path(image_path),
            prompt,
            options[0] if options else "?",
            options,
        )
        # A clear error for a missing or unreadable image, with advice predict can take.
        load_image(sample, hint="Pass --image an image file that exists and opens (PNG, JPEG, ...)")
        if options:
            rows = [sample] * len(options)
            batch = run.encoder.train_batch(rows, answers=list(options))
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with torch.no_grad(), run.plan.autocast(run.device.type):
                logits = run.model(**batch).logits
            nll = sequence_nll(logits, batch["labels"], decoder_only=run.encoder.decoder_only)
            scores = (-nll).cpu().tolist()
            for option, score in sorted(zip(options, scores, strict=True), key=lambda x: -x[1]):
                click.echo(f"{score:10.3f}  {option}")
            click.echo(f"answer: {options[int(torch.tensor(scores).argmax())]}")
        else:
            answer = generate_answers(
                run.model,
                run.encoder,
                [sample],
                device=run.device,
                autocast=lambda: run.plan.autocast(run.device.type),
            )[0]
            click.echo(f"answer: {answer}")
    except StabilizerError as err:
        _fail(err)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--tensorboard",
    "tensorboard",
    is_flag=True,
    help="also export TensorBoard event files (one folder per rank) to RUN_DIR/tensorboard "
    "(pip install 'stabilizer[tensorboard]')",
)
@click.option(
    "--tensorboard-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="export the event files here instead (implies --tensorboard)",
)
@click.option(
    "--wandb",
    "wandb",
    is_flag=True,
    help="also export each rank's trace as a W&B run in RUN_DIR/wandb, offline unless "
    "WANDB_MODE is set (pip install 'stabilizer[wandb]')",
)
def report(run_dir: Path, tensorboard: bool, tensorboard_dir: Path | None, wandb: bool) -> None:
    """Write RUN_DIR/report.html and its PNG plots from the run's trace store(s).

    Runs automatically at the end of `train --trace`, and when training stops on
    an anomaly or crashes; run it by hand on a run that was killed, or while one
    is still training (the store can be read while it is written). A torchrun run's
    stores (trace.db, trace.rank1.db, ...) are merged into one page.

    \b
    Examples:
      stabilizer report runs/latest
      stabilizer report runs/ddp --tensorboard && tensorboard --logdir runs/ddp/tensorboard
      stabilizer report runs/latest --wandb && wandb sync runs/latest/wandb/offline-run-*
    """
    from stabilizer.reports import write_report

    try:
        page = write_report(run_dir)
        click.echo(f"wrote {page}")
        if tensorboard or tensorboard_dir is not None:
            from stabilizer.reports.tensorboard import export_tensorboard

            option = "--tensorboard-dir" if tensorboard_dir is not None else "--tensorboard"
            log_dir = export_tensorboard(run_dir, tensorboard_dir, option=option)
            click.echo(f"wrote TensorBoard event files to {log_dir}")
        if wandb:
            from stabilizer.reports.wandb_sink import export_wandb

            for folder in export_wandb(run_dir, option="--wandb"):
                click.echo(f"wrote W&B run {folder}")
    except StabilizerError as err:
        _fail(err)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
def replay(bundle: Path, device: str) -> None:
    """Re-run the step saved in a repro bundle and diagnose it again.

    Bundles are written to runs/<name>/repro/step-N/ when `train --trace` finds an
    anomaly: the batch, the adapter and optimizer state before the step, the RNG
    state, the config and the original diagnosis. The model is rebuilt from the
    config (a preset, folder or hub id), so a bundle stays small.
    """
    from stabilizer.repro import replay_bundle

    try:
        anomaly, original = replay_bundle(bundle, device=device)
    except StabilizerError as err:
        _fail(err)
    click.echo(
        f"original diagnosis: step {original['step']}, {original['pass']} pass, {original['cause']}"
    )
    if anomaly is None:
        click.secho(
            "replayed: the step is finite here (different hardware or versions?)", fg="yellow"
        )
        sys.exit(1)
    click.echo(anomaly.card())
    same = anomaly.cause == original["cause"] and anomaly.pass_ == original["pass"]
    click.secho(
        "reproduced" if same else "a different failure than recorded",
        fg="green" if same else "yellow",
    )


if __name__ == "__main__":
    main()
