"""``main(argv)`` of the ``mixcache export`` command."""

from __future__ import annotations

from mixcache_compile.export import Manifest, main


def test_export_command_writes_a_manifest(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["tests.export.common:wan_spec", "--format", "onnx", "--out", str(out), "--variants", "",
                 "--policy", "static", "-o", "every=3"])
    assert code == 0, capsys.readouterr().err
    m = Manifest.load(out)
    assert m.policy["name"] == "static" and m.format == "onnx"
    assert {e.role for e in m.stages.values()} == {"prologue", "block", "epilogue"}
    assert "exported 5 stages x 1 signature(s)" in capsys.readouterr().out


def test_export_command_refuses_with_a_message(tmp_path, capsys):
    assert main(["tests.export.common:wan_spec", "--out", str(tmp_path), "--dynamic"]) == 2
    assert "cannot honour dynamic_shapes" in capsys.readouterr().err
    assert main(["not-a-spec", "--out", str(tmp_path)]) == 2
    assert "neither 'zoo' nor 'module:function'" in capsys.readouterr().err
    assert main(["tests.export.common:wan_spec", "--out", str(tmp_path), "--format", "coreml"]) == 2
    assert "valid formats: onnx, inductor" in capsys.readouterr().err
