"""Step time of each schedule of `pipeflow compare` relative to e2e, measured interleaved.

`pipeflow compare` trains its runs one after another, so a machine whose speed drifts during
the comparison skews their time ratios. Here every schedule takes a turn of 30 steps (the
mean of the last 24 is kept), round after round, so a drift touches them all alike; the
median ratio over the rounds is printed. Run from the repository root:

    .venv/bin/python docs/results/interleaved_step_ratios.py 5
"""

import statistics
import sys
import time

import torch

from pipeflow.config import load_config, with_overrides
from pipeflow.build import build_run
from pipeflow.train import make_phases, train_step

RUNS = [("e2e", "e2e", 1), ("alternate2", "alternate", 2), ("alternate3", "alternate", 3),
        ("pipeline2", "pipeline", 2), ("pipeline3", "pipeline", 3), ("sequential2", "sequential", 2)]


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    base = with_overrides(load_config("configs/mnist_compare.toml"), ["data.path=../shared/data/mnist.npz"])
    runs = {}
    for name, schedule, parts in RUNS:
        cfg = with_overrides(base, [f"train.schedule={schedule}", f"parts.count={max(parts, 2)}"])
        run = build_run(cfg)
        trainers = make_phases(run, torch.device("cpu"))[0].trainers
        batches = list(run.train_batches().epoch(0))[:30]
        with torch.no_grad():  # ActNorm initialisation, as `pipeflow train` does
            h = batches[0]
            for part in run.parts:
                h = part(h)[0]
        runs[name] = (schedule, trainers, batches)
    ratios = {name: [] for name in runs}
    for r in range(rounds):
        means = {}
        for name, (schedule, trainers, batches) in runs.items():
            seconds = []
            for i, x in enumerate(batches):
                # alternate: one part per step, in turn. sequential trains part 1 alone for half the
                # by-parts epochs, then part 2 after part 1 under no_grad: the same two kinds of step,
                # half of the steps each.
                one = schedule in ("alternate", "sequential")
                active = [i % len(trainers)] if one else list(range(len(trainers)))
                start = time.perf_counter()
                train_step(trainers, active, x)
                seconds.append(time.perf_counter() - start)
            means[name] = statistics.mean(seconds[6:])
        for name in runs:
            ratios[name].append(means[name] / means["e2e"])
        print(f"round {r}: e2e {1000 * means['e2e']:.1f} ms/step; "
              + ", ".join(f"{n} {means[n] / means['e2e']:.3f}" for n in runs if n != "e2e"), flush=True)
    print("median ratio over rounds: "
          + ", ".join(f"{n} {statistics.median(v):.3f}" for n, v in ratios.items() if n != "e2e"))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
