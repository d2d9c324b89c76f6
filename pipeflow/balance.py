"""Balanced cuts: the contiguous split of flow steps that minimises the costliest part.

In a pipeline every stage waits for the slowest one, so throughput is set by the
maximum part cost. An exact dynamic programme over the n flow steps finds the cuts in
O(P n^2); n is at most a few hundred.
"""

from __future__ import annotations

from typing import Sequence

from pipeflow.errors import UserError


def balanced_cuts(step_costs: Sequence[float], parts: int) -> list[int]:
    """Return the ``parts - 1`` cut points (numbers of steps before each) minimising the max part cost."""
    n = len(step_costs)
    if not n:
        raise UserError("the balanced scheme needs the cost of every flow step")
    if not 1 <= parts <= n:
        raise UserError(f"cannot balance {n} flow steps into {parts} parts")
    prefix = [0.0]
    for c in step_costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[p][i]: the smallest possible max cost of cutting the first i steps into p parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j])
                if cost < best[p][i]:
                    best[p][i], choice[p][i] = cost, j
    cuts, i = [], n
    for p in range(parts, 0, -1):
        i = choice[p][i]
        cuts.append(i)
    return sorted(cuts)[1:]
