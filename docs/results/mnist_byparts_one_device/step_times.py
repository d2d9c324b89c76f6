"""Seconds per training step of each schedule here, measured interleaved (a drifting machine touches
them all alike): every schedule takes a turn of 40 steps (the mean of the last 30 is kept), round after
round; the median over the rounds and its ratio to e2e's are printed and kept in step_times.json. A step is what
`pipeflow train` times: the parts' updates, the averaged feed's, and the averaged weights'
(`train.eval_ema`). `alternate` takes part 1 and part 2 in turn, as every turn length does over whole
pairs of turns. Run from the repository root (one thread):

    python docs/results/mnist_byparts_one_device/step_times.py 8

step_times.json is commit 7587b7b's (6 rounds); step_times_9fa2cdf_{before,after}.json are the runs'
commit's, measured just before and after it with the same script.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeflow.averaging import weight_average
from pipeflow.build import build_run
from pipeflow.config import load_config, with_overrides
from pipeflow.loop import train_step
from pipeflow.train import make_phases

BASE = ["parts.boundary_prior=flow", "train.eval_ema=0.999", "train.samples=0"]
SCHEDULES = {"e2e": ["parts.count=1", "train.schedule=e2e"],
             "pipeline": ["train.schedule=pipeline"],
             "pipeline_feed": ["train.schedule=pipeline", "train.feed_ema=0.99"],
             "alternate": ["train.schedule=alternate"]}
STEPS, KEPT = 40, 30


def prepare(overrides: list[str]):
    run = build_run(with_overrides(load_config("configs/mnist_compare.toml"), BASE + overrides))
    trainers = make_phases(run)[0].trainers
    batches = [x for _, x in zip(range(STEPS), run.train_batches().epoch(0))]
    with torch.no_grad():
        run.model.initialize(batches[0])  # the ActNorms' start, as a run's first message does
    return trainers, weight_average(run.model, 0.999), batches


def turn(trainers, average, batches, alternate: bool) -> float:
    seconds = []
    for i, x in enumerate(batches):
        start = time.perf_counter()
        train_step(trainers, [i % len(trainers)] if alternate else list(range(len(trainers))), x)
        average.update()
        seconds.append(time.perf_counter() - start)
    return statistics.mean(seconds[-KEPT:])


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    prepared = {name: prepare(o) for name, o in SCHEDULES.items()}
    times = {name: [] for name in SCHEDULES}
    for r in range(rounds):
        for name, (trainers, average, batches) in prepared.items():
            times[name].append(turn(trainers, average, batches, name == "alternate"))
        print(f"round {r}: " + ", ".join(f"{n} {1000 * t[-1]:.1f}" for n, t in times.items()) + " ms/step", flush=True)
    e2e = statistics.median(times["e2e"])
    ratios = {name: statistics.median(t) / e2e for name, t in times.items()}
    (Path(__file__).parent / "step_times.json").write_text(json.dumps({"rounds": rounds, "ratio_to_e2e": ratios,
                                                                       "seconds": times}, indent=1))
    for name, t in times.items():
        print(f"{name}: {1000 * statistics.median(t):.1f} ms/step, {statistics.median(t) / e2e:.3f} of e2e's "
              f"(ratios by round: {', '.join(f'{a / b:.3f}' for a, b in zip(t, times['e2e']))})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
