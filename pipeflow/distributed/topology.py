"""Ranks, stages and replicas.

World size is P x R: R replicas of a P-stage pipeline. Rank r is stage ``r % P`` of
replica ``r // P``, so the ranks of one pipeline are consecutive (on one node, forward
traffic stays inside it), and stage s of every replica forms a process group that
averages that stage's gradients when R > 1; each link from a stage to the next
is a process group of its own (:meth:`Topology.links`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeflow.errors import UserError


@dataclass(frozen=True)
class Topology:
    rank: int
    world: int
    stages: int  # P, the number of parts

    @classmethod
    def checked(cls, rank: int, world: int, stages: int) -> "Topology":
        if world % stages:
            raise UserError(
                f"{world} processes cannot run {stages} parts: the number of processes must be a multiple "
                f"of parts.count (torchrun --nproc_per_node={stages}, or {stages} x replicas)"
            )
        return cls(rank, world, stages)

    @property
    def replicas(self) -> int:
        return self.world // self.stages

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + 1

    def stage_ranks(self, stage: int) -> list[int]:
        """The ranks holding ``stage`` in every replica."""
        return [replica * self.stages + stage for replica in range(self.replicas)]

    def links(self) -> list[tuple[int, int]]:
        """Every forward link of the world, (sender, receiver), replica by replica, in pipeline order.

        Each is a process group of its own; every rank creates them in this order.
        """
        return [(replica * self.stages + k, replica * self.stages + k + 1)
                for replica in range(self.replicas) for k in range(self.stages - 1)]
