"""Where a training process runs: device, rank and world size, taken from ``torchrun``'s
environment (torchvision's ``references/classification/utils.init_distributed_mode`` is the
shape followed; no home-made process management).

``torchrun --nproc_per_node N -m oltr train …`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in every process; multi-node runs use torchrun's own
rendezvous (``--nnodes``, ``--rdzv-endpoint``). :func:`init_runtime` joins the process group
(``nccl`` on CUDA, ``gloo`` on CPU) when ``WORLD_SIZE`` > 1 and returns a :class:`Runtime`;
without those variables it is a single process. Every file is written by the primary rank
(rank 0) only; every metric a rank prints is all-reduced first.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from oltr.errors import InputError

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Runtime:
    """One process of a (possibly distributed) run.

    ``device``: where this rank computes (``cuda:LOCAL_RANK`` under torchrun on GPUs);
    ``rank`` / ``world_size``: this process's place among all of them; ``backend``: the
    process group's backend, or None for a single process.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_primary(self) -> bool:
        """True on the rank that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of ``values`` (float64 on the CPU; the values
        themselves on one process)."""
        tensor = torch.as_tensor(values, dtype=torch.float64)
        if not self.distributed:
            return tensor
        reduce_device = self.device if self.backend == "nccl" else torch.device("cpu")
        moved = tensor.to(reduce_device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.cpu()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` (same trailing shape on every rank, any first dimension)
        from all ranks in rank order; on one process, ``tensor`` itself."""
        if not self.distributed:
            return tensor
        reduce_device = self.device if self.backend == "nccl" else torch.device("cpu")
        local = tensor.contiguous().to(reduce_device)
        sizes = [torch.zeros(1, dtype=torch.long, device=reduce_device)
                 for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], device=reduce_device))
        largest = int(max(size.item() for size in sizes))
        padded = torch.zeros((largest, *local.shape[1:]), dtype=local.dtype, device=reduce_device)
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([part[: int(size.item())] for part, size in zip(gathered, sizes)]).to(
            tensor.device)

    def broadcast_object(self, value: Any) -> Any:
        """``value`` as rank 0 has it, on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``cpu``, ``cuda``,
    ``cuda:N`` and ``mps`` must exist on this machine (InputError naming the device otherwise).
    A bare ``cuda`` under torchrun means this process's GPU (``LOCAL_RANK``)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError("unknown device (auto, cpu, mps, cuda or cuda:N)", value=name) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but CUDA is not available", value=name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"no such CUDA device: this machine has "
                             f"{torch.cuda.device_count()}", value=name)
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("device 'mps' requested but MPS (Apple GPU) is not available",
                             value=name)
    elif device.type != "cpu":
        raise InputError("unsupported device (auto, cpu, mps, cuda or cuda:N)", value=name)
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's torch randomness (dropout, weight noise)."""
    return seed * 100_003 + epoch


def launched_by_torchrun() -> bool:
    """True when ``torchrun`` started this process with more than one rank."""
    return all(key in os.environ for key in _TORCHRUN_KEYS) and int(
        os.environ["WORLD_SIZE"]) > 1


def init_runtime(device_name: str = "auto", *, timeout_minutes: float = 30.0) -> Runtime:
    """The runtime of this process; joins the process group under torchrun (``nccl`` for
    CUDA devices, ``gloo`` otherwise). Calling it again in a process that has joined returns
    the same runtime."""
    if not launched_by_torchrun():
        return Runtime(select_device(device_name))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = select_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return Runtime(device, rank=rank, world_size=world_size, local_rank=local_rank,
                   backend=backend)


def shutdown_runtime(runtime: Runtime) -> None:
    """Leave the process group (no-op for a single process)."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def native_bf16(device: torch.device) -> bool:
    """True where bf16 arithmetic runs natively: CUDA devices that support it, CPUs with
    AVX512-BF16 or AMX (oneDNN's check). On an AVX2-only CPU bf16 autocast is emulated and
    measured 12× slower than fp32 (19 vs 231 img/s, the default benchmark's network,
    benchmarks/README.md)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def uses_bf16(amp: str, device: torch.device) -> bool:
    """Whether ``train.amp`` / ``eval.amp`` means bf16 autocast on ``device``: ``bf16`` always,
    ``auto`` only where bf16 is native (:func:`native_bf16`), ``off`` never."""
    if amp not in ("auto", "bf16", "off"):
        raise InputError("amp must be auto, bf16 or off", value=amp)
    return amp == "bf16" or (amp == "auto" and native_bf16(device))


def autocast(amp: str, device: torch.device):
    """bf16 autocast where :func:`uses_bf16` says so, else a no-op context."""
    from contextlib import nullcontext

    if not uses_bf16(amp, device):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
