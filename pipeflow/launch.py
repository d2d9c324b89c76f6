"""Entry point of a multi-process run, started by torchrun:

    torchrun --nproc_per_node=P -m pipeflow.launch --config configs/X.toml [--set k=v] [--out DIR]

P processes run the P parts as a forward-only pipeline; P x R processes run R replicas of
it. On GPUs rank r uses ``cuda:LOCAL_RANK`` with NCCL; without GPUs, the CPU with gloo.
This module is the only place that reads the environment torchrun sets.

Exit status: 0 done; 2 bad input (the same one line on every rank, before any rank can
hang on another); 1 a failure at run time (a silent peer, a diverged loss).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeflow.config import load_config
from pipeflow.distributed.topology import Topology
from pipeflow.distributed.transport import PeerSilent
from pipeflow.errors import EXIT_USAGE, UserError
from pipeflow.glow.invconv import SingularWeightError
from pipeflow.part_trainer import TrainingDiverged


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeflow.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", type=Path, default=None, help="TOML config file")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], help="section.key=value")
    p.add_argument("--out", "-o", type=Path, default=Path("runs/launch"), help="run directory (written by rank 0)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default=None, help="overrides distributed.backend")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    p.add_argument("--bandwidth", type=float, default=0.0, help="pace forward sends to this many bytes/s (0: unpaced)")
    return p


def choose_device(backend: str, local_rank: int) -> tuple[str, torch.device]:
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("distributed.backend = 'nccl' needs CUDA devices; use 'gloo' on CPUs")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before the process group: NCCL binds to the current device
        return backend, device
    return backend, torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world))
    initialised = False
    try:
        overrides = [*args.overrides, *([f"distributed.backend={args.backend}"] if args.backend else [])]
        cfg = load_config(args.config, overrides)
        stages = 1 if cfg.train.schedule == "e2e" else cfg.parts.count
        topo = Topology.checked(rank, world, stages)
        backend, device = choose_device(cfg.distributed.backend, local_rank)
        if device.type == "cpu":  # share the cores between the processes on this machine
            torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))
        elif cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if world == 1:
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", "29511")
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg.distributed.timeout_s),
                                device_id=device if device.type == "cuda" else None)
        initialised = True
        from pipeflow.multirank import RankContext, train_multirank  # noqa: PLC0415

        def announce(record: dict) -> None:
            print(f"[rank {rank}] by_parts epoch {record['epoch']}: stage {topo.stage} prefix "
                  f"{record['prefix_bpd']:.4f} bits/dim", flush=True)

        summary = train_multirank(cfg, RankContext(topo, device, args.bandwidth), args.out, force=args.force,
                                  on_eval=announce if topo.is_last and topo.replica == 0 else None)
        dist.barrier()  # leave together: tearing down while a peer still talks can abort it
        if summary is not None:
            print(f"[rank 0] test {summary['test_bpd']:.4f} bits/dim in {summary['wall_seconds']:.1f} s; "
                  f"forward {summary['comm']['forward_bytes']:,} B, backward {summary['comm']['backward_bytes']} B; "
                  f"run in {args.out}", flush=True)
        return 0
    except UserError as exc:
        print(f"pipeflow.launch: error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except (PeerSilent, TrainingDiverged, SingularWeightError) as exc:
        print(f"pipeflow.launch: failed (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if initialised:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
