"""Run configuration: validated dataclasses, one place for every default.

Each field's ``metadata["help"]`` is what ``stabilizer train --help`` shows, so
the CLI and the Python API document the same thing.

    >>> cfg = TrainConfig(max_steps=100, lr=1e-3)
    >>> cfg.to_dict()["lora"]["rank"]
    8
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stabilizer.errors import ConfigError
from stabilizer.models.lora import LoraSettings

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")
ADAPTER_DTYPES = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
BAD_SAMPLE_POLICIES = ("error", "skip")
DEVICES = ("auto", "cpu", "cuda")
ANOMALY_POLICIES = ("raise", "skip", "clip", "rollback", "warn", "repair")
WARNING_POLICIES = ("warn", "raise")
PREFLIGHT_MODES = ("stop", "warn", "off")
JUDGE_LATE_MODES = ("auto", "on", "off")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``runs/<name>/config.json``."""

    model: str = field(
        default="tiny-instructblip-t5",
        metadata=_help("preset name, local folder (save_pretrained output) or hub id"),
    )
    dataset: str = field(
        default="easy-vqa",
        metadata=_help(
            "easy-vqa, a ScienceQA or IconQA folder, a .jsonl file, or scienceqa:/iconqa:/jsonl:PATH"
        ),
    )
    train_split: str = field(default="train", metadata=_help("split to train on"))
    eval_split: str = field(default="test", metadata=_help("split to evaluate on"))
    max_train_samples: int | None = field(
        default=None, metadata=_help("use only the first N training samples")
    )
    max_eval_samples: int | None = field(
        default=1000, metadata=_help("evaluate on the first N samples of the eval split")
    )
    max_steps: int | None = field(
        default=2500, metadata=_help("optimizer steps to train; overrides --epochs when both set")
    )
    epochs: float | None = field(default=None, metadata=_help("passes over the training data"))
    batch_size: int = field(
        default=32, metadata=_help("samples per micro-batch (per rank under torchrun)")
    )
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    lr: float = field(default=3e-3, metadata=_help("peak learning rate of AdamW"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    adam_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    warmup_steps: int = field(default=50, metadata=_help("linear warm-up steps"))
    schedule: str = field(
        default="cosine", metadata=_help("decay after warm-up: cosine, linear or constant")
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata=_help("clip the gradient norm to this (none: no clipping)")
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    precision: str = field(
        default="fp32",
        metadata=_help("fp32; bf16 autocast; fp16 autocast with GradScaler (base weights in it)"),
    )
    adapter_dtype: str = field(
        default="fp32",
        metadata=_help(
            "dtype of the trainable tensors; fp16 reproduces the classic failure on purpose "
            "(fp16 base and adapters, AdamW state in fp16, no GradScaler)"
        ),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute LM activations in backward to save memory")
    )
    seed: int = field(default=0, metadata=_help("seed for weights of presets, data order, RNG"))
    device: str = field(default="auto", metadata=_help("auto (cuda if available), cpu or cuda"))
    eval_every: int | None = field(
        default=None, metadata=_help("evaluate every N steps (the end of training always)")
    )
    eval_batch_size: int = field(default=64, metadata=_help("samples per evaluation batch"))
    save_every: int | None = field(default=500, metadata=_help("checkpoint every N steps"))
    save_every_epochs: int | None = field(default=None, metadata=_help("checkpoint every N epochs"))
    keep_last: int | None = field(
        default=2, metadata=_help("keep the last K checkpoints (the final one is always kept)")
    )
    log_every: int = field(default=10, metadata=_help("log loss/lr/grad norm every N steps"))
    on_bad_sample: str = field(
        default="error", metadata=_help("error: stop naming the record; skip: drop and count it")
    )
    max_prompt_tokens: int = field(default=128, metadata=_help("prompt tokens kept (the end)"))
    max_answer_tokens: int = field(default=16, metadata=_help("answer tokens kept"))
    run_dir: Path | None = field(default=None, metadata=_help("run folder (default runs/<name>)"))
    run_name: str | None = field(
        default=None, metadata=_help("name of the run folder under runs/ (default: a timestamp)")
    )
    trace: bool = field(
        default=False,
        metadata=_help(
            "probe every Q-Former layer; name the first module to go NaN/Inf and the cause"
        ),
    )
    trace_every: int = field(
        default=1,
        metadata=_help("full statistics every N steps (the NaN/Inf check runs every step)"),
    )
    probe: str | None = field(
        default=None,
        metadata=_help("regex of module names to probe (default: the Q-Former preset)"),
    )
    compile_stats: bool = field(
        default=False,
        metadata=_help(
            "fuse the full statistics of each pass with torch.compile on a GPU (compiles "
            "once at start; a CPU keeps its per-tensor single-pass statistics, which are "
            "faster there)"
        ),
    )
    on_anomaly: str = field(
        default="raise",
        metadata=_help(
            "with --trace: raise, skip, clip, rollback, warn, or repair (apply the "
            "diagnosed fix: fp16 adapters and Adam state to fp32, an overflowing module to "
            "fp32, drop a bad batch, roll back a divergence; then redo the step)"
        ),
    )
    max_repairs: int = field(
        default=5,
        metadata=_help("with --on-anomaly repair: stop after this many repairs"),
    )
    on_warning: str = field(
        default="warn",
        metadata=_help(
            "with --trace, on an early warning (nothing non-finite yet: a huge update, "
            "fp16 headroom, steady growth): warn (print the card, train on) or raise (stop)"
        ),
    )
    judge_late: str = field(
        default="auto",
        metadata=_help(
            "with --trace: judge each step at the end of the next one, so that no step "
            "ends waiting for the GPU (its one copy to the host runs in the background); "
            "warnings and the diagnosis come one step later. Only with --on-anomaly warn "
            "and --on-warning warn (the other policies act within the step). auto: on "
            "where it saves a sync (warn on a GPU), off otherwise"
        ),
    )
    preflight: str = field(
        default="stop",
        metadata=_help(
            "checks before step 0 (dtypes under the optimizer, GradScaler, LoRA scope, "
            "checkpointing, the first batches): stop on an error, warn and train anyway, "
            "or off; --adapter-dtype fp16 reproduces its error on purpose and trains on"
        ),
    )
    max_anomalies: int = field(
        default=10, metadata=_help("stop with the diagnosis after this many anomalies")
    )
    rollback_lr_factor: float = field(
        default=0.5, metadata=_help("rollback multiplies the learning rate by this")
    )
    replay: bool = field(
        default=True,
        metadata=_help("on the first anomaly, re-run that step op by op and in fp32"),
    )
    tensorboard: bool = field(
        default=False,
        metadata=_help(
            "with --trace: also write TensorBoard event files to <run>/tensorboard "
            "(pip install 'stabilizer[tensorboard]')"
        ),
    )
    wandb: bool = field(
        default=False,
        metadata=_help(
            "with --trace: also log the trace to Weights & Biases in <run>/wandb, offline "
            "unless WANDB_MODE is set (pip install 'stabilizer[wandb]')"
        ),
    )
    blank_and_shuffled_eval: bool = field(
        default=True,
        metadata=_help("also evaluate with blank and shuffled images, to show the image is used"),
    )

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.run_dir is not None:
            self.run_dir = Path(self.run_dir)
        if self.run_name is not None:
            _check_run_name(self.run_name)
        _positive("--batch-size", self.batch_size)
        _positive("--grad-accum", self.grad_accum)
        _positive("--eval-batch-size", self.eval_batch_size)
        _positive("--log-every", self.log_every)
        _positive("--max-answer-tokens", self.max_answer_tokens)
        _positive("--max-prompt-tokens", self.max_prompt_tokens)
        for name, value in (
            ("--max-steps", self.max_steps),
            ("--eval-every", self.eval_every),
            ("--save-every", self.save_every),
            ("--save-every-epochs", self.save_every_epochs),
            ("--keep-last", self.keep_last),
            ("--max-train-samples", self.max_train_samples),
            ("--max-eval-samples", self.max_eval_samples),
        ):
            if value is not None:
                _positive(name, value)
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"--epochs must be a positive number, got {self.epochs}")
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("set --max-steps or --epochs: training needs an end")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.adam_eps >= 0:
            raise ConfigError(f"--adam-eps must be >= 0, got {self.adam_eps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(
                f"--max-grad-norm must be positive, got {self.max_grad_norm:g}; "
                "use --max-grad-norm none to train without clipping"
            )
        _choice("--precision", self.precision, PRECISIONS)
        _choice("--adapter-dtype", self.adapter_dtype, ADAPTER_DTYPES)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--on-bad-sample", self.on_bad_sample, BAD_SAMPLE_POLICIES)
        _choice("--device", self.device, DEVICES)
        _choice("--preflight", self.preflight, PREFLIGHT_MODES)
        _check_trace_options(self)
        if self.tensorboard and not self.trace:
            raise ConfigError(
                "--tensorboard exports the trace's statistics: add --trace (or export a "
                "traced run later with stabilizer report RUN_DIR --tensorboard)"
            )
        if self.wandb and not self.trace:
            raise ConfigError(
                "--wandb logs the trace's statistics: add --trace (or export a "
                "traced run later with stabilizer report RUN_DIR --wandb)"
            )

    @classmethod
    def smoke(cls, run_dir: Path | str, **overrides: Any) -> TrainConfig:
        """A run of a few seconds on the tiny preset: for tests, checks and trying things.

        >>> cfg = TrainConfig.smoke("runs/smoke", trace=True, adapter_dtype="fp16")
        """
        values: dict[str, Any] = dict(
            max_steps=8,
            batch_size=4,
            max_train_samples=64,
            max_eval_samples=8,
            eval_batch_size=8,
            save_every=4,
            keep_last=None,
            log_every=2,
            warmup_steps=2,
            lr=1e-3,
            blank_and_shuffled_eval=False,
            run_dir=Path(run_dir),
            lora=LoraSettings(targets="attention", rank=4),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def reproduces_classic_failure(self) -> bool:
        """``--adapter-dtype fp16``: adapters, their AdamW state and the base all in fp16."""
        return self.adapter_dtype == "fp16"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["run_dir"] = str(self.run_dir) if self.run_dir is not None else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        _check_types(cls, data, source)
        lora = data.get("lora")
        if isinstance(lora, dict):
            lora_known = {f.name for f in dataclasses.fields(LoraSettings)}
            if extra := sorted(set(lora) - lora_known):
                raise ConfigError(f"{source}: unknown field(s) lora.{', lora.'.join(extra)}")
            _check_types(LoraSettings, lora, source, prefix="lora.")
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such file; is this a stabilizer run folder?") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


@dataclass
class TraceSettings:
    """What ``--trace`` does: the part of a run's options a trace session needs.

    ``stabilizer train`` builds it from its :class:`TrainConfig`; integrations (the
    transformers ``TrainerCallback``) build it directly.

        >>> TraceSettings(on_anomaly="skip", trace_every=10)
    """

    probe: str | None = None  # regex of module names (default: the Q-Former preset)
    trace_every: int = 1
    compile_stats: bool = False
    on_anomaly: str = "raise"
    on_warning: str = "warn"  # "raise": stop at the first early warning too
    # "on": each step judged at the end of the next (no sync per step; warn only);
    # "auto": on where that saves a host-device sync (warn, on a GPU).
    judge_late: str = "auto"
    max_anomalies: int = 10
    max_repairs: int = 5
    rollback_lr_factor: float = 0.5
    # The op-level and fp32 replay of the first anomalous step (needs the step's batches).
    replay: bool = True
    adam_eps: float | None = None  # the optimizer's eps, for the fp16 "eps rounds to 0" cause
    max_grad_norm: float | None = None  # the clip the loop applies (the clip policy lowers it)
    tensorboard: bool = False  # also write TensorBoard event files beside the store
    wandb: bool = False  # also log to a W&B run (offline unless WANDB_MODE) in the run folder

    def __post_init__(self) -> None:
        _check_trace_options(self)

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> TraceSettings:
        # Every field here has a TrainConfig field of the same name and meaning.
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def _check_trace_options(obj: TrainConfig | TraceSettings) -> None:
    _choice("--on-anomaly", obj.on_anomaly, ANOMALY_POLICIES)
    _choice("--on-warning", obj.on_warning, WARNING_POLICIES)
    _choice("--judge-late", obj.judge_late, JUDGE_LATE_MODES)
    if obj.judge_late == "on" and (obj.on_anomaly != "warn" or obj.on_warning != "warn"):
        raise ConfigError(
            f"--judge-late on needs --on-anomaly warn and --on-warning warn (got "
            f"--on-anomaly {obj.on_anomaly}, --on-warning {obj.on_warning}): the other "
            "policies act on a step before the next one runs (raise stops in it; skip, "
            "clip, rollback and repair undo it). Use --judge-late auto or off"
        )
    _positive("--trace-every", obj.trace_every)
    _positive("--max-anomalies", obj.max_anomalies)
    _positive("--max-repairs", obj.max_repairs)
    if not 0 < obj.rollback_lr_factor <= 1:
        raise ConfigError(f"--rollback-lr-factor must be in (0, 1], got {obj.rollback_lr_factor}")


def judges_late(settings: TraceSettings, device: torch.device) -> bool:
    """Whether a run judges each step one step late (``judge_late``, on ``device``).

    "auto" turns it on where it saves something: under warn, on a GPU. On a CPU the
    readings are already on the host, so judging late would only delay the verdict."""
    if settings.judge_late != "auto":
        return settings.judge_late == "on"
    warn_only = settings.on_anomaly == "warn" and settings.on_warning == "warn"
    return warn_only and device.type == "cuda"


def field_help(cls: type, name: str) -> str:
    """The help text of one config field (used by the CLI)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _check_types(cls, data: dict[str, Any], source: str, *, prefix: str = "") -> None:
    """Every value of a config read from a file has its field's type: a config.json
    from elsewhere saying "lr": "x" is named here, not met as a TypeError mid-run."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        hint = hints.get(name)
        if hint is not None and not _matches(value, hint):
            raise ConfigError(
                f"{source}: field '{prefix}{name}' must be {_describe(hint)}, got {value!r}; "
                "fix the file, or start a new run instead of reusing it"
            )


def _matches(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, Path))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return True  # anything else is checked by the field's own validation


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    names = {type(None): "null", bool: "true/false", int: "a whole number", float: "a number"}
    names |= {str: "text", Path: "a path (text)"}
    return names.get(hint, "an object" if dataclasses.is_dataclass(hint) else str(hint))


def _check_run_name(name: str) -> None:
    """A run name is one folder name under runs/: never a path that leaves it."""
    bad = (
        not name
        or name in (".", "..", "latest")
        or any(c in name for c in "/\\\0")
        or name != name.strip()
        or name.startswith(("-", "."))
    )
    if bad:
        raise ConfigError(
            f"--run-name {name!r}: a run name is one folder name under runs/ (letters, "
            "digits, '-', '_'; no '/', no '..', not 'latest'); to put a run anywhere else "
            "use --run-dir PATH"
        )


def _positive(option: str, value: int | float) -> None:
    if not value > 0:
        raise ConfigError(f"{option} must be positive, got {value}")


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)}, got '{value}'")
