"""Running under ``torchrun``: one process per rank, DDP, and the verdict every rank agrees on.

    torchrun --nproc_per_node 2 -m stabilizer train --trace --batch-size 16

``--batch-size`` is per rank: the global batch is ``batch_size x world_size x
grad_accum``. Rank r trains on slice r of each global batch, so a run on N
ranks sees the same samples per step as a one-process run with an N times
larger batch.

What every rank must agree on is whether a step is kept. Each rank checks its
own replica; then one small collective per step (:meth:`RankGroup.agree`)
shares every rank's verdict, so all ranks skip, roll back or stop on the same
step and their replicas never diverge. The verdict is computed on the host from
the record the tracer has already copied, and exchanged over a gloo group, so
on GPUs (nccl) it adds no device->host sync of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stabilizer.errors import ConfigError
from stabilizer.probes.schema import PASSES

# Sent by each rank every step: (has anomaly, pass index, module index or -1, cause index).
_VERDICT_FIELDS = 4
_NO_PASS = len(PASSES)
# Evaluation and checkpoints run on rank 0 while the others wait at a barrier: a real
# model's evaluation can outlast torch's default 30 minutes.
_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class RankVerdict:
    """One rank's view of one step, as shared with every other rank."""

    rank: int
    anomalous: bool
    pass_index: int = _NO_PASS  # index into PASSES; _NO_PASS when clean
    module_index: int = -1
    cause_index: int = -1

    @property
    def pass_(self) -> str | None:
        return PASSES[self.pass_index] if self.pass_index < len(PASSES) else None


@dataclass(frozen=True)
class StepAgreement:
    """Every rank's verdict on one step, the same on all ranks."""

    verdicts: tuple[RankVerdict, ...]

    @property
    def anomalous(self) -> bool:
        return any(v.anomalous for v in self.verdicts)

    @property
    def anomalous_ranks(self) -> list[int]:
        return [v.rank for v in self.verdicts if v.anomalous]

    @property
    def origin_ranks(self) -> list[int]:
        """The ranks where the value went non-finite first: the earliest pass of the step.

        A NaN born in rank 1's forward pass reaches rank 0 only through the gradient
        all-reduce, so rank 0 sees it in a later pass (backward/optimizer).
        """
        bad = [v for v in self.verdicts if v.anomalous]
        if not bad:
            return []
        first = min(v.pass_index for v in bad)
        return [v.rank for v in bad if v.pass_index == first]


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables; ``(0, 1, 0)`` without."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(
            f"WORLD_SIZE/RANK/LOCAL_RANK must be integers (set by torchrun): {exc}"
        ) from exc
    return rank, world, local


class RankGroup:
    """This process's place in a torchrun job, and the few collectives stabilizer needs."""

    def __init__(self, rank: int, world_size: int, local_rank: int, *, owns_group: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self._owns_group = owns_group
        # Verdicts and control values travel on the host over gloo even when the
        # training group is nccl: a CPU tensor needs no device sync to be sent.
        self._host_group = (
            dist.new_group(backend="gloo", timeout=_TIMEOUT)
            if dist.get_backend() != "gloo"
            else dist.group.WORLD
        )

    @classmethod
    def start(cls, device_type: str) -> RankGroup | None:
        """Join the torchrun job (nccl on CUDA, gloo on CPU); None when not under torchrun."""
        rank, world, local = env_world()
        if world <= 1:
            return None
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend, timeout=_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, local: RankVerdict) -> StepAgreement:
        """Share this rank's verdict with every rank: the one collective per traced step."""
        mine = torch.tensor(
            [int(local.anomalous), local.pass_index, local.module_index, local.cause_index],
            dtype=torch.int64,
        )
        gathered = [torch.empty(_VERDICT_FIELDS, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self._host_group)
        return StepAgreement(
            tuple(
                RankVerdict(
                    rank=r,
                    anomalous=bool(row[0]),
                    pass_index=int(row[1]),
                    module_index=int(row[2]),
                    cause_index=int(row[3]),
                )
                for r, row in enumerate(t.tolist() for t in gathered)
            )
        )

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (e.g. the run folder name with a timestamp)."""
        data = (text or "").encode("utf-8") if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self._host_group)
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, src=0, group=self._host_group)
        return bytes(buffer.tolist()).decode("utf-8")

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (e.g. "this rank failed to start")."""
        value = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(value.item())

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a host tensor (losses for the log)."""
        out = values.detach().double().cpu().clone()
        dist.all_reduce(out, group=self._host_group)
        return out / self.world_size

    def barrier(self) -> None:
        dist.barrier(group=self._host_group)

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
