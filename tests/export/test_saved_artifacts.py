"""Saved inductor artifacts: a second process loads them and runs without compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mixcache_compile
from mixcache_compile.export import export
from tests.export.common import wan_kwargs, wan_pipe

ROOT = Path(__file__).resolve().parents[2]

SECOND_PROCESS = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import torch
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters
    import torch._inductor.compile_fx as cfx
    def refuse(*a, **k):
        raise AssertionError("inductor compiled a graph in the second process")
    cfx.compile_fx = cfx.compile_fx_inner = refuse
    from mixcache_compile.export import ExportedTransformer
    from tests.export.common import wan_kwargs, wan_pipe
    pipe = wan_pipe()
    transformer = ExportedTransformer(sys.argv[1]).install(pipe)
    with torch.no_grad():
        frames = pipe(**wan_kwargs()).frames
    torch.save(frames, sys.argv[2])
    print(json.dumps({"seconds": time.perf_counter() - start, "loads": transformer.engine.loads,
                      "counters": {k: dict(v) for k, v in counters.items()},
                      "trace": [e.action for e in transformer.session.trace]}))
""")


@pytest.mark.inductor
def test_second_process_loads_saved_artifacts_without_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    out = tmp_path / "artifacts"
    # Only the plain stages: the policy (static every=2, STEP reuse) needs no variant.
    report = export(wan_pipe(), wan_kwargs(1), out, format="inductor", variants=(), policy="static", every=2)
    assert report.graphs_exported == 3  # prologue, one graph for the three equal blocks, epilogue
    torch_pipe = wan_pipe()
    session = mixcache_compile.enable(torch_pipe, policy="static", engine="eager", every=2)
    with torch.no_grad():
        want = torch_pipe(**wan_kwargs()).frames
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cold-cache"),
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(out), str(tmp_path / "frames.pt")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["loads"] == 3
    inductor = info["counters"].get("inductor", {})
    assert inductor.get("fxgraph_cache_miss", 0) == 0 and inductor.get("fxgraph_cache_hit", 0) == 3, inductor
    assert info["counters"].get("aot_autograd", {}).get("autograd_cache_miss", 0) == 0
    assert info["trace"] == [e.action for e in session.trace] and "STEP" in info["trace"]
    got = torch.load(tmp_path / "frames.pt")
    assert (got - want).abs().max().item() <= 1e-4
