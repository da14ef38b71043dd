"""Saved inductor artifacts: a second process loads them and runs without compiling; a
damaged artifact, kernel or parameter file, or an export made with other versions, is refused
before anything is loaded (artifacts are code)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mixcache_compile
from mixcache_compile.export import ExportedTransformer, Manifest, export
from mixcache_compile.export.compat import ExportVersionError
from mixcache_compile.export.integrity import IntegrityError
from tests.export.common import wan_kwargs, wan_pipe
from tests.export.tamper import copy_export, flip_byte, rewrite_manifest, truncate

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


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One inductor export for the module (compiling is the slow part: ~1-10 min here)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    out = tmp_path_factory.mktemp("inductor") / "artifacts"
    try:
        # Only the plain stages: the policy (static every=2, STEP reuse) needs no variant.
        report = export(wan_pipe(), wan_kwargs(1), out, format="inductor", variants=(), policy="static", every=2)
    finally:
        mp.undo()
    return out, report


@pytest.mark.inductor
@pytest.mark.slow
def test_second_process_loads_saved_artifacts_without_compiling(artifacts, tmp_path):
    out, report = artifacts
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


def _damaged(artifacts, tmp_path, pick) -> tuple:
    out = copy_export(artifacts[0], tmp_path / "copy")
    manifest = Manifest.load(out)
    rel = pick(manifest)
    return out, rel


@pytest.mark.inductor
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["artifact", "kernel", "parameters", "cache entry"])
def test_damaged_inductor_file_is_refused_before_loading(artifacts, tmp_path, kind, monkeypatch):
    picks = {
        "artifact": lambda m: m.stages["block.0.1"].files["s0"].file,
        "kernel": lambda m: next(f for f in sorted(m.files) if f.endswith(".so")),
        "parameters": lambda m: m.weights["file"],
        "cache entry": lambda m: next(f for f in sorted(m.files) if "/fxgraph/" in f),
    }
    out, rel = _damaged(artifacts, tmp_path, picks[kind])
    assert rel in Manifest.load(out).files  # every file loading reads is recorded, kernels included
    flip_byte(out / rel)
    import torch._inductor as inductor

    def refuse(*args, **kwargs):
        raise AssertionError("a damaged export reached CompiledArtifact.load")

    monkeypatch.setattr(inductor.CompiledArtifact, "load", refuse)
    with pytest.raises(IntegrityError, match=rf"{Path(rel).name} has SHA-256 .*the manifest records"):
        ExportedTransformer(out)
    truncate(out / rel)
    with pytest.raises(IntegrityError, match=rf"{Path(rel).name} is \d+ bytes; the manifest records \d+ bytes \(truncated"):
        ExportedTransformer(out)


@pytest.mark.inductor
@pytest.mark.slow
@pytest.mark.parametrize("name, version", [("torch", "2.12.0"), ("python", "3.10"), ("mixcache-compile", "0.0.1")])
def test_inductor_export_from_other_versions_is_refused(artifacts, tmp_path, name, version):
    out = copy_export(artifacts[0], tmp_path / "copy")
    rewrite_manifest(out, lambda raw: raw["created_with"].update({name: version}))
    with pytest.raises(ExportVersionError, match=rf"saved inductor artifacts made with other versions: {name} "
                                                 rf"{re.escape(version)} \(export\) vs .* \(running\).*export again"):
        ExportedTransformer(out)
