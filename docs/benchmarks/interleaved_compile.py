"""The end-to-end step eager and compiled, in both memory layouts, timed interleaved in one process.

`pipeflow bench` times its eager and compiled rows one after the other, and this machine's speed
drifts between them (the same compiled step took 0.80 s in one bench and 1.06 s in another, an hour
apart). Here four trainers of the same model on the same batch (eager, eager channels_last, compiled,
compiled channels_last) take turns of ``--turn`` steps, round after round, so that a drift touches
them all alike; each turn's median step is kept, and each variant's ratio to the eager step is the
median over rounds of the ratio within a round. ``--malloc bench`` (the default) gives large blocks
the heap as bench's timed steps do (fixed mmap and trim thresholds of 32 and 64 MiB); ``--malloc glibc``
keeps glibc's defaults, as ``pipeflow train`` runs. Run from the repository root:

    .venv/bin/python docs/benchmarks/interleaved_compile.py --rounds 6 --turn 6 [--malloc glibc]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from pipeflow.build import build_model, in_memory_format
from pipeflow.config import load_config
from pipeflow.data import dataset_shape, load_dataset, n_bins
from pipeflow.part_trainer import PartTrainer
from pipeflow.parts import whole_model_part
from pipeflow.tools.bench_worker import allocate_for_speed, bench_batches

VARIANTS = {"eager": (False, False), "eager channels_last": (False, True), "compiled": (True, False),
            "compiled channels_last": (True, True)}


def trainer(cfg, shape, bins: int, compiled: bool, channels_last: bool, first: torch.Tensor) -> PartTrainer:
    """A trainer of the whole model (seeded as every entry point seeds it), its ActNorms started on ``first``."""
    train = dataclasses.replace(cfg.train, compile=compiled, channels_last=channels_last)
    cfg = dataclasses.replace(cfg, train=train)
    torch.manual_seed(cfg.train.seed)
    part = in_memory_format(whole_model_part(build_model(cfg, shape)), cfg)
    tr = PartTrainer(part, cfg.train.lr, train, first[0].numel(), bins, name="whole model")
    tr.forward(first, torch.zeros(len(first)))
    return tr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/mnist.toml")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--turn", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--malloc", choices=("bench", "glibc"), default="bench")
    args = p.parse_args()
    if args.malloc == "bench":
        allocate_for_speed()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    data = load_dataset(cfg.data)
    first, batch = bench_batches(cfg, cfg.train.batch_size, 2, data)
    shape, bins = dataset_shape(cfg.data), n_bins(data, cfg.data.n_bits)
    trainers = {name: trainer(cfg, shape, bins, c, cl, first) for name, (c, cl) in VARIANTS.items()}
    zeros = torch.zeros(len(batch))
    for name, tr in trainers.items():  # compilation happens here, apart from the timed turns
        start = time.perf_counter()
        for _ in range(args.warmup):
            tr.train_step(batch, zeros)
        print(f"{name}: {args.warmup} warm-up steps in {time.perf_counter() - start:.1f} s", flush=True)
    medians = {name: [] for name in trainers}
    for r in range(args.rounds):
        for name, tr in trainers.items():
            times = []
            for _ in range(args.turn):
                start = time.perf_counter()
                tr.train_step(batch, zeros)
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
        print(f"round {r}: " + ", ".join(f"{n} {1000 * m[-1]:.0f} ms" for n, m in medians.items()), flush=True)
    print("\n| variant | median step ms (over rounds) | eager / variant, per round (median, min-max) |")
    print("|---|---:|---|")
    for name, ms in medians.items():
        ratios = [e / v for e, v in zip(medians["eager"], ms)]
        print(f"| {name} | {1000 * statistics.median(ms):.0f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
