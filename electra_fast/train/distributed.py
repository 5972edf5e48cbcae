"""torchrun / DistributedDataParallel plumbing: one process per device, rank 0 writes.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is initialised with gloo on
CPU and nccl on CUDA; each rank takes its own slice of every global batch (see trainer), gradients are
averaged by DDP, and only rank 0 logs and writes checkpoints while the others wait at a barrier.

Multi-node (run on every node, same --out on a shared filesystem)::

    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_backend c10d \
        --rdzv_endpoint $HEAD_NODE:29500 -m electra_fast pretrain --data corpus/ --out /shared/run

DDP keeps a full replica of the model and optimizer on every device, which is right for every ELECTRA /
DeBERTa-v3 size up to large (~335 M parameters + AdamW fits easily on one GPU). Prefer FSDP (not wired in
here) only when parameters + optimizer state no longer fit one device.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._validate import reason
from .errors import PretrainError


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (``t`` itself when alone)."""
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def all_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along dim 0 in rank order (``t`` when alone). Its length may differ
        between ranks (a step's real tokens do under doc-sentences packing): sizes first, then padded parts."""
        if not self.distributed:
            return t
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.empty_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a signal reached one process)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def same_on_every_rank(self, values: dict, hint: str) -> None:
        """PretrainError on every rank (none waits at a collective for a rank that stopped) when any of
        ``values`` (option name -> a picklable value) differs from rank 0's; ``hint`` says what to do."""
        if not self.distributed:
            return
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, values)
        for rank, theirs in enumerate(gathered):
            for name, value in theirs.items():
                if value != gathered[0].get(name):
                    raise PretrainError(f"{name}: {_difference(value, gathered[0].get(name), rank)}: {hint}")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _difference(value, main, rank: int) -> str:
    """How ``value`` (rank ``rank``'s) differs from rank 0's ``main``, in a line of bounded length: for two lists
    (a folder's 2,000 files) the first element that differs, not both lists."""
    if isinstance(value, (list, tuple)) and isinstance(main, (list, tuple)):
        at = next((i for i, (a, b) in enumerate(zip(value, main)) if a != b), None)
        if at is not None:
            return f"rank {rank} has {_short(value[at])} where rank 0 has {_short(main[at])} (item {at + 1})"
        return f"rank {rank} has {len(value)} items, rank 0 {len(main)}"
    return f"rank {rank} has {_short(value)}, rank 0 {_short(main)}"


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_device(device: "str | torch.device") -> torch.device:
    """``--device`` (cpu, cuda, cuda:N) as a torch.device; PretrainError when this machine cannot run it."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", str(device))
    if m is None:
        raise PretrainError(f"--device: expected cpu, cuda or cuda:N, got {str(device)!r}")
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA GPU is visible" if torch.backends.cuda.is_built() else "this torch is built without CUDA"
            raise PretrainError(f"--device {device}: {why}; use --device cpu")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise PretrainError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(str(device))


def torchrun_ranks() -> "tuple[int, int, int]":
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without a world of several processes
    (a RANK left in a shell means nothing)."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    try:
        world = int(env["WORLD_SIZE"] or 1)
        if world <= 1:
            return 0, 1, 0
        rank = int(env["RANK"])
        return rank, world, int(env["LOCAL_RANK"] or rank)
    except (TypeError, ValueError):
        shown = ", ".join(f"{k}={v!r}" for k, v in env.items())
        raise PretrainError(f"torchrun's environment: expected integers, got {shown}") from None


def setup(device: "str | None" = None) -> Context:
    rank, world, local_rank = torchrun_ranks()
    if device is None:
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = check_device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        except (ValueError, dist.DistError) as e:  # a partial torchrun environment (no MASTER_ADDR), a port taken
            raise PretrainError(f"torchrun's environment (WORLD_SIZE={world}, RANK={rank}): the process group did "
                                f"not start ({reason(e)}); launch with torchrun, which sets MASTER_ADDR and "
                                "MASTER_PORT, or unset WORLD_SIZE to run one process") from None
        owns = True
    return Context(rank=rank, world=world, local_rank=local_rank, device=dev, owns_group=owns)
