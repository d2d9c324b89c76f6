"""One process group per pipeline link, each driven by one thread per rank (gloo, spawned ranks).

Every rank's calls into torch.distributed are recorded (which group, which thread) while a
few messages travel down the pipeline through the real Inbox/Outbox, with collectives on the
world and on the stage groups between them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeflow.distributed.collectives import guard, is_peer_trouble
from pipeflow.distributed.topology import Topology
from pipeflow.distributed.transport import STOP, TRAIN, Inbox, Kind, Outbox, PeerSilent, link_groups

SHAPE = (2, 3)
STEPS = 7  # more than the Outbox's header buffers (in_flight + 2), so each is reused


def _spy(calls: list) -> None:
    """Record every point-to-point call, collective and group creation of this process."""

    def key(group):
        if group is None or group == dist.GroupMember.WORLD:
            return "world"
        return "-".join(map(str, dist.get_process_group_ranks(group)))

    def wrap(name, fn, group_at):
        def spied(*args, **kwargs):
            group = kwargs.get("group", args[group_at] if len(args) > group_at else None)
            thread = threading.current_thread()
            calls.append({"op": name, "group": key(group), "thread": thread.name,
                          "main": thread is threading.main_thread()})
            return fn(*args, **kwargs)
        return spied

    for name, group_at in (("isend", 2), ("irecv", 2), ("send", 2), ("recv", 2), ("all_reduce", 2),
                           ("barrier", 0), ("broadcast", 2)):
        setattr(dist, name, wrap(name, getattr(dist, name), group_at))
    new_group = dist.new_group

    def spied_new_group(ranks=None, *args, **kwargs):
        calls.append({"op": "new_group", "ranks": list(ranks), "main": threading.current_thread()
                      is threading.main_thread()})
        return new_group(ranks, *args, **kwargs)

    dist.new_group = spied_new_group


def _rank(rank: int, world: int, stages: int, port: int, out: str) -> None:
    calls: list = []
    _spy(calls)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    topo = Topology(rank, world, stages)
    links = link_groups(topo, 30.0)
    dist.barrier()
    inbox = None if topo.is_first else Inbox(rank, topo.prev_rank, SHAPE, torch.device("cpu"), 30.0, links.prev)
    outbox = None if topo.is_last else Outbox(rank, topo.next_rank, SHAPE, torch.device("cpu"), 2, 0.0,
                                              timeout_s=30.0, group=links.next)
    received = []
    for step in range(STEPS + 1):
        if inbox is None:
            kind, h = (TRAIN, torch.full((2, *SHAPE), float(step))) if step < STEPS else (STOP, None)
            carry = None if h is None else torch.zeros(2)
        else:
            msg = inbox.recv()
            kind, h, carry = msg.kind, msg.h, msg.carry
            received.append([int(msg.kind), msg.step, None if h is None else h.mean().item()])
        if outbox is not None:
            outbox.send(kind, 0, step, None if h is None else h + 1, carry)
        if links.stage is not None and kind == TRAIN:  # a stage's collective, between messages
            dist.all_reduce(torch.ones(1), group=links.stage)
    if outbox is not None:
        outbox.close()
    dist.barrier()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"calls": calls, "received": received}, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,stages", [(3, 3), (4, 2)])
def test_each_link_has_its_own_group_used_by_one_thread_per_rank(tmp_path, world, stages):
    mp.start_processes(_rank, args=(world, stages, _free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    created = [[c["ranks"] for c in r["calls"] if c["op"] == "new_group"] for r in ranks]
    assert all(order == created[0] for order in created), "every rank creates its groups in the same order"
    expected_links = [[a, b] for a, b in Topology(0, world, stages).links()]
    assert [g for g in created[0] if g in expected_links] == expected_links
    for rank, record in enumerate(ranks):
        calls = record["calls"]
        assert all(c["main"] for c in calls if c["op"] in ("new_group", "all_reduce", "barrier", "broadcast"))
        p2p = [c for c in calls if c["op"] in ("isend", "irecv", "send", "recv")]
        assert p2p and all(c["group"] != "world" for c in p2p), "no message travels on the default group"
        traffic = [c for c in calls if "group" in c]
        for group in {c["group"] for c in traffic}:
            threads = {c["thread"] for c in traffic if c["group"] == group}
            assert len(threads) == 1, f"rank {rank} used group {group} from threads {threads}"
        senders = {c["thread"] for c in p2p if c["op"] == "isend"}
        stage = rank % stages
        assert senders == (set() if stage == stages - 1 else {f"send-{rank}-to-{rank + 1}"})
        if stage:  # every message arrived in order, each payload as the previous stage made it
            expected = [[int(TRAIN), s, float(s + stage)] for s in range(STEPS)] + [[int(STOP), STEPS, None]]
            assert record["received"] == expected


def test_message_kinds_are_an_enum_with_their_bare_names():
    assert [Kind(k) for k in range(5)] == [Kind.INIT, Kind.TRAIN, Kind.EVAL, Kind.EVAL_END, Kind.STOP]
    assert TRAIN is Kind.TRAIN and STOP == 4


def _timeout_rank(rank: int, port: int, out: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=2))
    outcome = {}
    if rank == 0:  # rank 1 never joins the barrier: a silent peer
        try:
            with guard("the test barrier", 2.0):
                dist.barrier()
        except PeerSilent as exc:
            outcome["silent"] = str(exc)
        try:
            with guard("the test barrier", 2.0):
                raise RuntimeError("a bug that mentions gloo, nccl, a timeout and a peer")
        except PeerSilent:
            outcome["bug"] = "reworded"
        except RuntimeError:
            outcome["bug"] = "kept"
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(outcome, f)
    if rank == 1:
        import time  # noqa: PLC0415

        time.sleep(6)  # outlive rank 0's timeouts, then leave without a word
    os._exit(0)  # no teardown of a group whose peer is gone


def test_a_timeout_is_told_by_its_origin_and_a_bug_by_none_of_its_words(tmp_path):
    mp.start_processes(_timeout_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert "rank 0: the test barrier got no answer" in outcome["silent"]
    assert outcome["bug"] == "kept"


def test_torch_distributed_error_types_are_peer_trouble_and_others_are_not():
    assert is_peer_trouble(dist.DistBackendError("work timed out"))
    assert is_peer_trouble(dist.DistNetworkError("connection reset"))
    assert not is_peer_trouble(RuntimeError("NCCL error: gloo timed out, peer closed"))
    assert not is_peer_trouble(PeerSilent("rank 1 is silent"))


def test_a_plain_runtime_error_from_torch_distributed_is_peer_trouble_under_gloo_only(monkeypatch):
    """Gloo's timeouts are plain RuntimeErrors from torch.distributed; under NCCL one is a misuse (a CPU
    tensor handed to a collective) and must not be re-worded as a silent peer."""
    with pytest.raises(RuntimeError) as raised:
        dist.rendezvous("nowhere://")  # a plain RuntimeError raised inside torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for backend, trouble in (("gloo", True), ("nccl", False)):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert is_peer_trouble(raised.value) is trouble
