"""Rank-consistent decisions: two gloo processes on CPU, each with a shard of the sequence."""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

from tests.runtime import dist_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_take_the_same_decisions(tmp_path):
    mp.spawn(dist_worker.main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    local = [[e["indicator"] for e in r["local"]] for r in ranks]
    reduced = [r["reduced"] for r in ranks]
    # Alone, each rank sees a different indicator (its own shard)...
    assert any(a != b for a, b in zip(local[0][1:], local[1][1:]))
    # ...reduced across ranks, indicators and decisions are identical at every step.
    assert [e["indicator"] for e in reduced[0]] == [e["indicator"] for e in reduced[1]]
    assert [e["action"] for e in reduced[0]] == [e["action"] for e in reduced[1]]
    assert {e["action"] for e in reduced[0]} >= {"FULL"}
