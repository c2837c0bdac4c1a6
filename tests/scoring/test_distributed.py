"""Tests for fairpruner._scoring.distributed: fp.score under torch.distributed (2 CPU processes, gloo) equals a
single-process run on the same data."""
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fairpruner as fp
from fairpruner import zoo


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 16, 16, generator=g)
    y = torch.arange(6).repeat(8)
    return x, y


def _model():
    torch.manual_seed(0)
    return zoo.vgg(cfg=[8, "M", 16, "M", 16], num_classes=6, batch_norm=True)


def _batches(x, y, rank=0, world=1):
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(y), 8)]
    return batches[rank::world]


def _worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = _data()
        s = fp.score(_model(), _batches(x, y, rank, world), example_inputs=x[:2], samples_per_class=16,
                     projections=16, seed=3)
        torch.save({"u": [g.u for g in s.groups], "r": [g.r for g in s.groups], "names": s.names,
                    "peak": s.meta["u_store"]["peak_bytes"]}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = _data()
    single = fp.score(_model(), _batches(x, y), example_inputs=x[:2], samples_per_class=16, projections=16, seed=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["names"] == ranks[1]["names"] == single.names
    for a, b in zip(ranks[0]["u"] + ranks[0]["r"], ranks[1]["u"] + ranks[1]["r"]):
        assert torch.equal(a, b)  # every rank returns identical scores
    for got, want in zip(ranks[0]["u"], [g.u for g in single.groups]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(ranks[0]["r"], [g.r for g in single.groups]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # Each slice's samples go to one owner rank: a rank never holds the whole store.
    for r in ranks:
        assert r["peak"] <= 0.6 * single.meta["u_store"]["peak_bytes"], (r["peak"], single.meta["u_store"])


def _failing_worker(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = _data()
        if rank == 1:
            x = x.clone()
            x[10] = float("nan")  # batch 1: only this rank's shard holds a broken sample
        try:
            fp.score(_model(), _batches(x, y, rank, world), example_inputs=x[:2], samples_per_class=16,
                     projections=16, seed=3)
            message = "no error"
        except fp.FairPrunerError as e:
            message = str(e)
        with open(f"{path}/rank{rank}.txt", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def test_a_failure_on_one_rank_stops_every_rank(tmp_path):
    context = mp.spawn(_failing_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "a rank is still waiting: scoring hung"
    assert "NaN" in (tmp_path / "rank1.txt").read_text()
    assert "another rank" in (tmp_path / "rank0.txt").read_text()
