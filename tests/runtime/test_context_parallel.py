"""Caching on top of diffusers' context parallelism: two gloo processes on CPU, each one rank of
``enable_parallelism(ContextParallelConfig(ulysses_degree=2 | ring_degree=2))`` on a tiny Wan.

Every rank's output must equal the single-process output of the same policy (within 1e-4),
both ranks must take the same action at every call, and each policy must actually reuse
something (else the comparison would only show that computing in full is exact).
"""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

from tests.runtime import cp_worker
from tests.tiny_models import wan

TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REFERENCES: dict[str, dict] = {}


def single_process(name: str) -> dict:
    """The policy's loop without context parallelism (the reference), computed once per process."""
    if name not in _REFERENCES:
        _REFERENCES[name] = cp_worker.denoise(wan()[0], name)
    return _REFERENCES[name]


def _run_ranks(tmp_path, cases: list[tuple[str, str, bool]]) -> list[dict]:
    mp.spawn(cp_worker.main, args=(2, _free_port(), str(tmp_path), cases), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _max_diff(a: list, b: list) -> float:
    import torch

    return (torch.tensor(a) - torch.tensor(b)).abs().max().item()


def _check(ranks: list[dict], key: str, reference: dict) -> None:
    actions = [[e["action"] for e in r[key]["trace"]] for r in ranks]
    # Both ranks take the same action at every call, and it is the single-process action.
    assert actions[0] == actions[1], key
    assert actions[0] == [e["action"] for e in reference["trace"]], key
    assert any(a != "FULL" for a in actions[0]), f"{key}: nothing was reused"
    assert all(e["fallback"] is None for r in ranks for e in r[key]["trace"]), key
    for r in ranks:
        assert r[key]["calls"] == cp_worker.STEPS, f"{key}: a call did not reach the session"
        for out, ref in zip(r[key]["outputs"], reference["outputs"]):
            assert _max_diff(out, ref) <= TOLERANCE, key
    # Indicators are reduced over the group: equal on both ranks, and equal to the
    # single-process indicator of the whole sequence.
    for e0, e1, ref in zip(ranks[0][key]["trace"], ranks[1][key]["trace"], reference["trace"]):
        assert e0["indicator"] == e1["indicator"], key
        if ref["indicator"] is not None:
            assert e0["indicator"] == pytest.approx(ref["indicator"], rel=1e-4), key


def _check_shard_decisions(ranks: list[dict]) -> None:
    """``dist_worker``'s loop: each rank holds a different shard of the sequence."""
    local = [[e["indicator"] for e in r["shard/local"]] for r in ranks]
    reduced = [r["shard/reduced"] for r in ranks]
    # Alone, each rank sees a different indicator (its own shard)...
    assert any(a != b for a, b in zip(local[0][1:], local[1][1:]))
    # ...reduced across ranks, indicators and decisions are identical at every step.
    assert [e["indicator"] for e in reduced[0]] == [e["indicator"] for e in reduced[1]]
    assert [e["action"] for e in reduced[0]] == [e["action"] for e in reduced[1]]
    assert {e["action"] for e in reduced[0]} >= {"FULL"}


@pytest.mark.slow
def test_ranks_decide_alike_and_reuse_as_a_single_process_does(tmp_path):
    """Ranks reduce their indicators to the same decisions (sharded loop); every policy under
    Ulysses through ``enable``; ring attention with the direct backend
    (``torch.compile(backend="mixcache")``). One pair of processes runs every case: starting
    them and initialising the group costs more than a case."""
    names = list(cp_worker.POLICIES)
    cases = [(name, "ulysses", False) for name in names] + [("static", "ring", True)]
    ranks = _run_ranks(tmp_path, cases)
    _check_shard_decisions(ranks)
    for name in names:
        _check(ranks, f"{name}/ulysses/enable", single_process(name))
    _check(ranks, "static/ring/backend", single_process("static"))
