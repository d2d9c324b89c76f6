"""Joining and leaving the process group: the one set-up that ``pipeflow.launch`` and the bench workers share.

A rank reads who it is from the environment torch's launcher sets (``torchrun`` or
``python -m torch.distributed.run``), picks its device *before* the group exists (NCCL
binds a communicator to the current device), and joins with the run's timeout.

Two choices matter on NCCL:

* No ``device_id`` is given to ``init_process_group``. With one, the default group sets up
  its communicator eagerly, and every unbatched send/recv on the default group would share
  it. Here each pipeline link has a process group of its own (:func:`.transport.link_groups`), so each
  communicator is used by one thread of each rank.
* No ``TORCH_NCCL_BLOCKING_WAIT``. Point-to-point waits carry their own timeout (which
  blocks the waiting thread and raises), and a collective that outlives the group's timeout
  is ended by torch's watchdog under ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` (docs/distributed.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeflow.errors import UserError


@dataclass(frozen=True)
class RankEnv:
    """Who this process is, as torch's launcher tells it (one process alone when nothing is set)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    attempt: int = 0  # TORCHELASTIC_RESTART_COUNT: 0 on the first attempt, k after k restarts

    @classmethod
    def from_environ(cls, env=None) -> "RankEnv":
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", 1))
        return cls(rank=int(env.get("RANK", 0)), world=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", world)),
                   attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))


@dataclass(frozen=True)
class Membership:
    """What joining gave this rank: its backend, its device and the store of this attempt."""

    backend: str
    device: torch.device
    store: object


def choose_device(backend: str, local_rank: int) -> tuple[str, torch.device]:
    """``auto`` -> NCCL on ``cuda:LOCAL_RANK`` when CUDA is present, else gloo on the CPU.

    The CUDA device is made current here, before any process group: NCCL binds to it.
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend != "nccl":
        return backend, torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("distributed.backend = 'nccl' needs CUDA devices; use 'gloo' on CPUs")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return backend, device


def join(backend: str, who: RankEnv, timeout_s: float) -> Membership:
    """Choose this rank's device, then join the world's process group with ``timeout_s``.

    Under torchrun the store is the launcher's; it outlives a restarted attempt, so each
    attempt works under keys of its own (``pipeflow/attempt{k}/``): a restart reading the
    dead attempt's keys would connect to ranks that are gone. One process alone gets a
    store in memory, with no port to collide on.
    """
    backend, device = choose_device(backend, who.local_rank)
    timeout = timedelta(seconds=timeout_s)
    if who.world == 1:
        store = dist.HashStore()
    else:
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"pipeflow/attempt{who.attempt}", store)
    dist.init_process_group(backend, store=store, rank=who.rank, world_size=who.world, timeout=timeout)
    return Membership(backend, device, store)


def leave() -> None:
    """Destroy every process group of this rank; call it on every rank after the last collective."""
    if dist.is_initialized():
        dist.destroy_process_group()
