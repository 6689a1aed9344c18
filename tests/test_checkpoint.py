"""Checkpoints: exact resume, state round-trips, atomic saves, validation, no unpickling."""

from __future__ import annotations

import json
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from stabilizer import checkpoint as ckpt_mod
from stabilizer.checkpoint import (
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainable_weights,
    save_checkpoint,
)
from stabilizer.errors import CheckpointError

DIM, N_DATA, BATCH = 8, 32, 8


class Tiny(nn.Module):
    """A stand-in for the Q-Former: named Linear layers, dropout, and query tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(1, DIM) * 0.02)
        self.body = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(DIM, 16),
                act=nn.GELU(),
                drop=nn.Dropout(0.2),
                fc2=nn.Linear(16, 4),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + self.query_tokens)


def build_base() -> Tiny:
    """The frozen "pretrained" weights: the same in every run, like a hub checkpoint."""
    torch.manual_seed(0)
    return Tiny()


def build_model(init_seed: int, rank: int = 4) -> PeftModel:
    """Base + LoRA, with LoRA and query tokens initialised from ``init_seed``."""
    base = build_base()
    torch.manual_seed(init_seed)
    model = get_peft_model(base, LoraConfig(r=rank, target_modules=["fc1", "fc2"]))
    query = model.base_model.model.query_tokens
    with torch.no_grad():
        query.normal_(std=0.02)
    query.requires_grad_(True)  # trained directly, outside LoRA (peft froze it)
    return model


def build_run(
    seed: int, rank: int = 4
) -> tuple[PeftModel, torch.optim.AdamW, LambdaLR, torch.Generator]:
    """Seed every RNG, then build model, optimizer, warmup schedule and sampler generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = build_model(seed, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler, torch.Generator().manual_seed(seed)


DATA_X = torch.linspace(-1, 1, N_DATA * DIM).reshape(N_DATA, DIM)
DATA_Y = torch.sin(DATA_X[:, :4] * 3)


def train(model, optimizer, scheduler, gen, steps: int) -> list[float]:
    """Steps drawing from every RNG a real loop uses: sampler, dropout, python, numpy."""
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, N_DATA, (BATCH,), generator=gen)
        noise = random.random() * 0.01 + float(np.random.rand()) * 0.01
        loss = nn.functional.mse_loss(model(DATA_X[idx] + noise), DATA_Y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(run_dir: Path, step: int, run, **kwargs) -> Path:
    model, optimizer, scheduler, gen = run
    return save_checkpoint(
        run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
        generators=[gen], **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One checkpoint after 2 steps, shared by the read-only tests."""
    run = build_run(1)
    train(*run, 2)
    path = save(tmp_path_factory.mktemp("run"), 2, run, extra={"epoch": 0, "pos": 16})
    return path, trainable(run[0])


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    full_run = build_run(123)
    full = train(*full_run, 6)

    first_run = build_run(123)
    first = train(*first_run, 3)
    save(tmp_path, 3, first_run, extra={"epoch": 0})

    resumed_run = build_run(999)  # other seed: everything must come from the checkpoint
    state = load_checkpoint(
        find_latest_checkpoint(tmp_path), model=resumed_run[0], optimizer=resumed_run[1],
        scheduler=resumed_run[2], generators=[resumed_run[3]],
    )  # fmt: skip
    assert state["step"] == 3 and state["extra"] == {"epoch": 0}
    rest = train(*resumed_run, 3)

    assert first + rest == full
    final, expected = trainable(resumed_run[0]), trainable(full_run[0])
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[n], expected[n]) for n in expected)


def test_optimizer_scheduler_scaler_round_trip_keeps_dtypes(tmp_path: Path) -> None:
    model, optimizer, scheduler, gen = build_run(5)
    model.double()  # float64 moments next to AdamW's float32 step: dtypes must survive
    train(model, optimizer, scheduler, gen, 2)
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    except (RuntimeError, ValueError) as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"GradScaler('cpu') unsupported: {err}")
    path = save_checkpoint(
        tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
    )

    model2, optimizer2, scheduler2, _ = build_run(6)
    model2.double()
    scaler2 = torch.amp.GradScaler("cpu")
    load_checkpoint(
        path, model=model2, optimizer=optimizer2, scheduler=scheduler2, scaler=scaler2,
        restore_rng=False,
    )  # fmt: skip

    saved, loaded = optimizer.state_dict(), optimizer2.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]  # betas stays a tuple
    assert loaded["state"].keys() == saved["state"].keys()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert loaded["state"][index][key].dtype == value.dtype, key
            assert torch.equal(loaded["state"][index][key], value), key
    assert saved["state"][0]["step"].dtype == torch.float32
    assert saved["state"][0]["exp_avg"].dtype == torch.float64
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert scaler2.state_dict() == scaler.state_dict()


def test_trainer_state_is_plain_json(trained_ckpt) -> None:
    path, _ = trained_ckpt
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["extra"] == {"epoch": 0, "pos": 16}
    assert path.name == "step-00000002" and path.parent.name == "checkpoints"


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no cleanup handler runs."""


@pytest.mark.parametrize("error", [OSError("disk full"), _Killed()])
def test_failed_save_keeps_last_checkpoint(tmp_path: Path, monkeypatch, error) -> None:
    run = build_run(2)
    first = save(tmp_path, 1, run)
    real_write = ckpt_mod._write_safetensors

    def failing_write(path: Path, tensors) -> None:
        if path.name == "optimizer.safetensors":
            raise error
        real_write(path, tensors)

    monkeypatch.setattr(ckpt_mod, "_write_safetensors", failing_write)
    with pytest.raises(type(error)):
        save(tmp_path, 2, run)
    assert find_latest_checkpoint(tmp_path) == first
    leftovers = list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert len(leftovers) == (1 if isinstance(error, _Killed) else 0)

    monkeypatch.setattr(ckpt_mod, "_write_safetensors", real_write)
    second = save(tmp_path, 2, run)
    assert find_latest_checkpoint(tmp_path) == second
    assert list((tmp_path / "checkpoints").glob(".tmp-*")) == []


def test_keep_last_and_resave_same_step(tmp_path: Path) -> None:
    run = build_run(3)
    for step in range(1, 6):
        save(tmp_path, step, run, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]

    again = save(tmp_path, 5, run, keep_last=1, extra={"again": True})
    assert list_checkpoints(tmp_path) == [again]
    assert load_checkpoint(again, model=run[0], restore_rng=False)["extra"] == {"again": True}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005"]


def test_interrupted_resave_is_still_found_and_put_back(tmp_path: Path) -> None:
    run = build_run(4)
    path = save(tmp_path, 7, run)
    aside = path.parent / ".old-step-00000007-abcd1234"
    path.rename(aside)  # killed between "move old aside" and "move new into place"
    assert find_latest_checkpoint(tmp_path) == aside
    save(tmp_path, 8, run)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000007", "step-00000008"]


def test_incomplete_folders_are_ignored(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir(parents=True)  # no trainer_state.json
    (root / ".tmp-step-00000010-deadbeef").mkdir()
    (root / ".tmp-step-00000010-deadbeef" / "trainer_state.json").write_text("{}")
    assert list_checkpoints(tmp_path) == []


def test_other_lora_rank_is_refused_with_names(trained_ckpt) -> None:
    path, _ = trained_ckpt
    other = build_model(1, rank=8)
    with pytest.raises(CheckpointError) as info:
        load_trainable_weights(path, other)
    message = str(info.value)
    assert str(path) in message
    assert "base_model.model.body.fc1.lora_A.default.weight" in message
    assert "rank" in message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    run = build_run(5)
    path = save(tmp_path, 1, run)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        load_checkpoint(path, model=run[0], optimizer=run[1])


def test_load_never_unpickles(trained_ckpt, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    path, expected = trained_ckpt
    model, optimizer, scheduler, gen = build_run(8)
    load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, generators=[gen])
    assert all(torch.equal(trainable(model)[n], expected[n]) for n in expected)


def test_adapter_loads_with_peft(trained_ckpt) -> None:
    path, expected = trained_ckpt
    loaded = PeftModel.from_pretrained(build_base(), path)
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, expected[n]) for n, p in lora.items())
