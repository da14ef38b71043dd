"""Export is atomic (Note [atomic export]): an export that fails mid-write leaves no directory
that loads and no staging directory; a re-export replaces an earlier one whole or not at all;
a directory of other files is never replaced."""

from __future__ import annotations

import errno

import pytest

from mixcache_compile.export import ExportedTransformer, ExportError, Manifest, export
from mixcache_compile.export import exporter as exporter_module
from mixcache_compile.export import staging as staging_module
from mixcache_compile.export.integrity import verify_files
from tests.export.common import wan_kwargs, wan_pipe
from tests.export.tamper import copy_export


def _fail_mid_write(monkeypatch, after: int) -> list[str]:
    """Make the ONNX writer write half of its (after+1)-th file, then fail as a full disk does."""
    written: list[str] = []
    original = exporter_module._OnnxWriter.write

    def write(self, call, io, sig_id):
        if len(written) == after:
            target = self.out / f"onnx/{call.stage.name}.{sig_id}.onnx"
            target.write_bytes(b"\x08\x07" * 64)  # the start of a file, as a write cut short leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        rel = original(self, call, io, sig_id)
        written.append(rel)
        return rel

    monkeypatch.setattr(exporter_module._OnnxWriter, "write", write)
    return written


def _leftovers(parent, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_export_failing_mid_write_leaves_nothing(tmp_path, monkeypatch):
    written = _fail_mid_write(monkeypatch, after=1)
    out = tmp_path / "new"
    with pytest.raises(OSError, match="No space left on device"):
        export(wan_pipe(), wan_kwargs(1), out, variants=())
    assert len(written) == 1  # it failed mid-way (one file written, the next cut short), not before writing
    assert not out.exists() and _leftovers(tmp_path, "new") == []


def test_reexport_replaces_whole_or_not_at_all(export_dir, tmp_path, monkeypatch):
    src, _ = export_dir("wan")  # policy static, variants attn_reused + probe
    out = copy_export(src, tmp_path / "target")
    before = Manifest.load(out)
    # A re-export that fails mid-write leaves the earlier export as it was: it loads and verifies.
    _fail_mid_write(monkeypatch, after=0)
    with pytest.raises(OSError):
        export(wan_pipe(), wan_kwargs(1), out, variants=(), policy="none")
    monkeypatch.undo()
    assert Manifest.load(out).files == before.files and _leftovers(tmp_path, "target") == []
    verify_files(out, before.files)
    # One that succeeds replaces it whole: nothing of the earlier export (probe files) remains.
    export(wan_pipe(), wan_kwargs(1), out, variants=(), policy="none")
    after = Manifest.load(out)
    assert after.policy["name"] == "none" and not any(".probe." in f for f in after.files)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(after.files) | {"manifest.json"}
    assert _leftovers(tmp_path, "target") == []
    (tmp_path / "plain").mkdir()  # the export gets the permissions a plain mkdir would give it
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    ExportedTransformer(out)


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to export into .*mine: it is not empty and holds no manifest.json"):
        export(wan_pipe(), wan_kwargs(1), out)
    assert (out / "notes.txt").read_text() == "keep me" and _leftovers(tmp_path, "mine") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        export(wan_pipe(), wan_kwargs(1), tmp_path / "file")


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_publish_swaps_an_earlier_export_for_the_new_one(tmp_path, monkeypatch, exchange):
    if exchange == "two renames":
        monkeypatch.setattr(staging_module, "_exchange", lambda a, b: False)
    old, new = tmp_path / "out", tmp_path / ".out.staging-x"
    for d, files in ((old, ("manifest.json", "old.onnx")), (new, ("manifest.json", "new.onnx"))):
        d.mkdir()
        for f in files:
            (d / f).write_text(d.name)
    staging_module.publish(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["manifest.json", "new.onnx"]
    assert (old / "manifest.json").read_text() == ".out.staging-x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
