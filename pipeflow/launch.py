"""Entry point of a multi-process run, started by torchrun:

    torchrun --nproc_per_node=P -m pipeflow.launch --config configs/X.toml [--set k=v] [--out DIR]

P processes run the P parts as a forward-only pipeline; P x R processes run R replicas of
it. Without ``parts.count`` (in the config or ``--set``) every process holds one part: with no
config at all, ``torchrun --nproc_per_node=3 -m pipeflow.launch`` trains the default digits
model in 3 parts. On GPUs rank r uses ``cuda:LOCAL_RANK`` with NCCL; without GPUs, the CPU with gloo.
It joins the process group with :func:`pipeflow.distributed.process_group.join`, as the bench workers do.

Exit status: 0 done; 2 bad input (the same one line on every rank, before any rank can
hang on another); 1 a failure at run time (a silent peer, a diverged loss).

``--resume auto`` continues the run in ``--out`` from its checkpoints. Under
``torchrun --max-restarts=K`` a restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) always
resumes, and ``--force`` clears the directory on the first attempt only.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from pipeflow.config import load_config
from pipeflow.distributed.process_group import RankEnv, join, leave
from pipeflow.distributed.topology import Topology
from pipeflow.distributed.transport import PeerSilent
from pipeflow.errors import EXIT_USAGE, UserError
from pipeflow.glow.invconv import SingularWeightError
from pipeflow.part_trainer import TrainingDiverged

if TYPE_CHECKING:
    from pipeflow.multirank import RankHooks


_group_started = False  # set once this process has (begun to) join a process group
_store = None  # this attempt's store, once the process group has one


def _linger(store, rank: int, world: int, seconds: float = 10.0) -> None:
    """Wait (briefly) until every rank has reached this point too.

    torchrun stops every worker once one has exited, so a rank that left at once could cut
    the others off before they printed their line.
    """
    try:
        store.set(f"leaving/{rank}", "1")
        store.wait([f"leaving/{r}" for r in range(world)], timedelta(seconds=seconds))
    except Exception:  # noqa: BLE001 (a rank gone, or the store with it: leave anyway)
        pass


class _Arguments(argparse.ArgumentParser):
    """argparse, with a bad argument refused as every other bad input is: one line, exit status 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see 'python -m pipeflow.launch --help')")


def _parser() -> argparse.ArgumentParser:
    p = _Arguments(prog="python -m pipeflow.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", type=Path, default=None, help="TOML config file")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], help="section.key=value")
    p.add_argument("--out", "-o", type=Path, default=Path("runs/launch"), help="run directory (written by rank 0)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default=None, help="overrides distributed.backend")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    p.add_argument("--resume", choices=("auto",), default=None,
                   help="auto: continue the run in --out from the newest step every rank has saved")
    p.add_argument("--bandwidth", type=float, default=0.0,
                   help="pace forward sends and DDP all-reduces to this many bytes/s per rank (0: unpaced)")
    return p


def say(line: str, stream=None) -> None:
    """One whole line in one write: the lines of several ranks sharing a terminal never run together."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _report(summary: dict | None, out: Path) -> None:
    """Rank 0's closing line."""
    if summary is None:
        return
    if summary.get("already_finished"):
        say(f"[rank 0] the run in {out} has already finished (test {summary['test_bpd']:.4f} bits/dim); "
            "nothing to resume")
        return
    step = summary.get("resumed_from_step")
    resumed = f" (resumed after step {step})" if step else ""
    say(f"[rank 0] test {summary['test_bpd']:.4f} bits/dim in {summary['wall_seconds']:.1f} s{resumed}; "
        f"forward {summary['comm']['forward_bytes']:,} B, backward {summary['comm']['backward_bytes']} B; run in {out}")


def main(argv: list[str] | None = None, hooks_for: Callable[[int, int], "RankHooks"] | None = None) -> int:
    """One rank's run; ``hooks_for(rank, attempt)`` may add hooks to it (the tests' injected faults)."""
    who = RankEnv.from_environ()
    rank, world, attempt = who.rank, who.world, who.attempt
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help, printed: argparse's only exit (a bad argument raises UserError)
            return 0 if exc.code is None else int(exc.code)
        resume = args.resume == "auto" or attempt > 0  # a restart continues its own run
        force = args.force and attempt == 0  # ... and never clears what the first attempt saved
        overrides = [*args.overrides, *([f"distributed.backend={args.backend}"] if args.backend else [])]
        cfg = load_config(args.config, overrides, processes=world)  # parts.count left out: one part per process
        stages = 1 if cfg.train.schedule == "e2e" else cfg.parts.count
        topo = Topology.checked(rank, world, stages)
        global _group_started, _store
        _group_started = True
        membership = join(cfg.distributed.backend, who, cfg.distributed.timeout_s)
        _store, device = membership.store, membership.device
        if device.type == "cpu":  # share the cores between the processes on this machine
            torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // max(who.local_world, 1)))
        elif cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        from pipeflow.multirank import RankContext, RankHooks, train_multirank  # noqa: PLC0415

        def announce(record: dict) -> None:
            say(f"[rank {rank}] by_parts epoch {record['epoch']}: stage {topo.stage} prefix "
                f"{record['prefix_bpd']:.4f} bits/dim")

        ctx = RankContext(topo, device, args.bandwidth, hooks_for(rank, attempt) if hooks_for else RankHooks())
        summary = train_multirank(cfg, ctx, args.out, force=force,
                                  on_eval=announce if topo.is_last and topo.replica == 0 else None, resume=resume)
        _report(summary, args.out)
        leave()  # after the run's last barrier: no peer talks to this one any more
        return 0
    except UserError as exc:
        say(f"pipeflow.launch: error (rank {rank}): {exc}", sys.stderr)
        if _store is not None:  # the ranks found it together: let each say it before any leaves
            _linger(_store, rank, world)
        return EXIT_USAGE
    except (PeerSilent, TrainingDiverged, SingularWeightError) as exc:
        # No teardown of the process group: with a peer silent it could block. The process ends
        # (see run()), and its peers see the link close.
        say(f"pipeflow.launch: failed (rank {rank}): {exc}", sys.stderr)
        return 1


def run(hooks_for: Callable[[int, int], "RankHooks"] | None = None) -> None:
    """Run :func:`main` and end the process with its status.

    Once a process group exists, the interpreter's teardown is skipped (``os._exit``): with a
    peer gone it can block, and even after a clean run gloo's teardown sometimes aborted a
    rank (SIGABRT, "terminate called without an active exception") after all the work was
    done and saved. Before that (bad input found by each rank alone), the process ends as usual.
    """
    try:
        code = main(None, hooks_for)
    except BaseException:  # noqa: BLE001 (a bug: show it, and still never hang on teardown)
        import traceback  # noqa: PLC0415

        traceback.print_exc()
        code = 1
    if dist.is_initialized() or _group_started:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
