"""Export refuses, naming why, what it cannot honour; the runtime refuses calls it was not
exported for; TensorRT without CUDA raises one clear error; a TensorRT engine set assembles
(and runs, through the same state machine) with a fake builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mixcache_compile
from mixcache_compile.export import ExportedTransformer, ExportError, Manifest, ManifestError, OrtTransformer, export
from mixcache_compile.export import tensorrt as trt_export
from mixcache_compile.export.ort_runtime import OrtLoader
from tests.export.common import decisions, wan_kwargs, wan_pipe
from tests.export.tamper import copy_export, flip_byte, rewrite_manifest
from tests.tiny_models import wan


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "torchscript"}, "unknown export format 'torchscript'; valid formats: onnx, inductor"),
        ({"format": "tensorrt"}, "TensorRT engines are built from an ONNX export"),
        ({"dynamic_shapes": {"hidden_states": {3: "h"}}}, "static specialisations only and cannot honour dynamic_shapes"),
        ({"policy": "nonesuch"}, "unknown policy 'nonesuch'"),
        ({"policy": "fastercache", "attn_weight": lambda step, num_steps: 0.5}, "attn_weight cannot be written as JSON"),
        ({"variants": ("attn_reused", "lora")}, r"unknown variant kind\(s\) \['lora'\]"),
    ],
)
def test_refuses_requests_it_cannot_honour(tmp_path, kwargs, match):
    with pytest.raises((ExportError, ValueError), match=match):
        export(wan_pipe(), wan_kwargs(1), tmp_path, **kwargs)
    assert not (tmp_path / "manifest.json").exists()


def test_refuses_a_policy_object(tmp_path):
    from mixcache_compile.policies.none import NonePolicy

    with pytest.raises(ExportError, match="give the policy by name"):
        export(wan_pipe(), wan_kwargs(1), tmp_path, policy=NonePolicy())


def test_refuses_symbolic_dimensions_other_than_the_cfg_batch(tmp_path):
    model, make = wan()
    kwargs = make(1)
    torch._dynamo.mark_dynamic(kwargs["hidden_states"], 3)
    with pytest.raises(ExportError, match="symbolic dimension 3 .*export supports static shapes"):
        export(model, kwargs, tmp_path)


def test_refuses_a_model_it_cannot_plan(tmp_path):
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, hidden_states):
            return (self.proj(hidden_states),)

    with pytest.raises(ExportError, match="cannot be planned into stages"):
        export(NoBlocks(), {"hidden_states": torch.randn(2, 4)}, tmp_path)


def test_runtime_refuses_unexported_shapes_arguments_and_engines(export_dir, tmp_path):
    out, _ = export_dir("wan")
    with pytest.raises(ExportError, match="unknown exported engine 'tvm'; valid engines: inductor, onnxruntime, tensorrt"):
        ExportedTransformer(out, "tvm")
    with pytest.raises(ExportError, match="engine 'inductor' runs inductor exports; this directory holds a onnx export"):
        ExportedTransformer(out, "inductor")
    transformer = OrtTransformer(out, policy="none")
    _, make = wan()
    kwargs = make(1)
    with pytest.raises(ExportError, match="traced with attention_kwargs=None"):
        transformer(**kwargs, attention_kwargs={"scale": 1.0})
    bigger = {**kwargs, "hidden_states": torch.randn(1, 4, 2, 16, 16)}
    with pytest.raises(ExportError, match="no exported specialisation .*Exports are static"):
        transformer(**bigger)
    got = transformer(**kwargs)[0]  # the exported shape still works, and equals the model
    model, _ = wan()
    with torch.no_grad():
        torch.testing.assert_close(got, model(**kwargs)[0], rtol=0, atol=1e-5)
    # A manifest of another version is refused, naming both versions.
    bad = copy_export(out, tmp_path / "old")
    rewrite_manifest(bad, lambda raw: raw.update(version=99))
    with pytest.raises(ManifestError, match="manifest version 99; this mixcache_compile reads version 2"):
        Manifest.load(bad)
    with pytest.raises(ManifestError, match="not an export directory"):
        Manifest.load(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_tensorrt_without_cuda_raises_one_clear_error(export_dir):
    out, _ = export_dir("wan")
    with pytest.raises(trt_export.TensorRTUnavailable, match=r"TensorRT engines need a CUDA device .*torch.cuda.is_available\(\) is False") as err:
        trt_export.build_engines(out)
    message = str(err.value)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "the 'tensorrt' Python package (pip install 'mixcache-compile[tensorrt]')" in message
    with pytest.raises(trt_export.TensorRTUnavailable, match="CUDA device"):
        ExportedTransformer(out, "tensorrt")


class FakeBuilder:
    """Stands in for TensorRT: a "plan" names the ONNX file it was built from; loading it runs
    onnxruntime on that file and records which file it was."""

    def __init__(self):
        self.built: list[str] = []
        self.loaded: list[Path] = []

    def build(self, onnx_path: Path, settings) -> bytes:
        self.built.append(onnx_path.name)
        return b"FAKEPLAN\n" + str(onnx_path.resolve()).encode()

    def load(self, plan: bytes):
        head, _, path = plan.partition(b"\n")
        assert head == b"FAKEPLAN"
        self.loaded.append(Path(path.decode()))
        return OrtLoader(threads=1).load(Path(path.decode()))


def test_tensorrt_engine_set_assembly_with_a_fake_builder(export_dir, tmp_path):
    """What this checks is the engine-set assembly around TensorRT (which needs a GPU this
    machine lacks): one plan per stage file, rebuilt only when its file or the settings change,
    plans checked against their recorded SHA-256, and the loader handing each stage the plan
    built from that stage's file. The numbers come from onnxruntime behind the fake builder, so
    the outputs equal the onnxruntime engine's exactly unless a stage got another stage's plan."""
    out = copy_export(export_dir("wan")[0], tmp_path / "export")
    manifest = Manifest.load(out)
    files = {f.file for e in manifest.stages.values() for f in e.files.values()}
    builder = FakeBuilder()
    engines = trt_export.build_engines(out, builder=builder)
    assert engines.built == len(files) == len(builder.built) and engines.reused == 0
    assert set(engines.plans) == files and all((out / p).is_file() for p in engines.plans.values())
    assert sorted(builder.built) == sorted(f.rsplit("/", 1)[-1] for f in files)
    again = trt_export.build_engines(out, builder=FakeBuilder())
    assert again.built == 0 and again.reused == len(files)  # unchanged files: nothing rebuilt
    fp16 = trt_export.build_engines(out, builder=FakeBuilder(), settings=trt_export.TensorRTSettings(fp16=True))
    assert fp16.built == len(files)  # other settings: every plan rebuilt
    # The assembled set runs the same state machine; each stage runs the plan of its own file.
    schedule = {2: "step", (3, "uncond"): "cfg", 4: "block:1-3", 5: "attn:0,1,2"}
    results = {}
    runner = FakeBuilder()
    for engine, options in (("tensorrt", {"builder": runner}), ("onnxruntime", {})):
        pipe = wan_pipe()
        t = ExportedTransformer(out, engine, engine_options=options, policy="static", schedule=schedule).install(pipe)
        with torch.no_grad():
            results[engine] = (pipe(**wan_kwargs(8)).frames, decisions(t.session.trace), set(t.engine._raw))
    assert results["tensorrt"][1] == results["onnxruntime"][1]
    torch.testing.assert_close(results["tensorrt"][0], results["onnxruntime"][0], rtol=0, atol=0)
    assert sorted(runner.loaded) == sorted((out / f).resolve() for f in results["tensorrt"][2]) and runner.loaded
    # A corrupted plan is refused when loaded; a corrupted export is refused before building.
    plan = out / engines.plans[manifest.stages["prologue"].files["s0"].file]  # every call runs the prologue
    flip_byte(plan, 0)
    with pytest.raises(trt_export.IntegrityError, match="does not match the SHA-256 build_engines recorded"):
        pipe = wan_pipe()
        ExportedTransformer(out, "tensorrt", engine_options={"builder": FakeBuilder()}, policy="none").install(pipe)
        with torch.no_grad():
            pipe(**wan_kwargs(1))
    flip_byte(out / manifest.weights["file"])
    with pytest.raises(trt_export.IntegrityError, match="weights.bin has SHA-256"):
        trt_export.build_engines(out, builder=FakeBuilder())
