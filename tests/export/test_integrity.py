"""Loading an ONNX export checks every file against the SHA-256 and size the manifest records:
a flipped byte in a graph, zeroed weights, a corrupted manifest, a truncated or a missing file
each end in an ``IntegrityError`` naming the file, never in a wrong output. Versions that
differ from the export's are warned about (ONNX is data)."""

from __future__ import annotations

import re
import time
import warnings

import pytest
import torch

from mixcache_compile.export import ExportedTransformer, Manifest
from mixcache_compile.export.compat import ExportVersionWarning
from mixcache_compile.export.integrity import IntegrityError, forget_verified, verify_files
from tests.export.tamper import copy_export, flip_byte, rewrite_manifest, truncate, zero_block
from tests.tiny_models import wan


@pytest.fixture
def copy(export_dir, tmp_path):
    """A private copy of the tiny Wan ONNX export (made once per session) to damage."""
    src, _ = export_dir("wan")
    return copy_export(src, tmp_path / "export")


def _block_file(directory) -> str:
    return Manifest.load(directory).stages["block.0.1"].files["s0"].file


def _reference():
    model, make = wan()
    kwargs = make(1)
    with torch.no_grad():
        return kwargs, model(**kwargs)[0]


def test_intact_export_is_hashed_once_per_process_and_rehashed_after_a_write(copy):
    manifest = Manifest.load(copy)
    named = {f.file for e in manifest.stages.values() for f in e.files.values()} | {manifest.weights["file"]}
    assert set(manifest.files) == named  # every file the runtime reads has a record
    forget_verified()
    assert verify_files(copy, manifest.files) == len(named)
    assert verify_files(copy, manifest.files) == 0  # Note [verified once per process]
    weights = copy / manifest.weights["file"]
    time.sleep(0.05)  # past the filesystem's timestamp granularity (Note [verified once per process])
    weights.write_bytes(weights.read_bytes())  # same bytes, but written: its ctime changed
    assert verify_files(copy, manifest.files) == 1
    kwargs, want = _reference()
    got = ExportedTransformer(copy, policy="none")(**kwargs)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["onnx graph", "weights"])
def test_flipped_byte_in_a_file_is_refused_naming_it(copy, kind):
    rel = _block_file(copy) if kind == "onnx graph" else Manifest.load(copy).weights["file"]
    flip_byte(copy / rel)
    with pytest.raises(IntegrityError, match=re.escape(str(copy / rel)) + r" has SHA-256 [0-9a-f]{16}\.\.\., the manifest records"):
        ExportedTransformer(copy)


def test_zeroed_weights_are_refused_and_would_have_given_a_wrong_output(copy):
    """The issue's reproduction: 1 KiB of zeros in the middle of weights.bin."""
    rel = Manifest.load(copy).weights["file"]
    zero_block(copy / rel)
    with pytest.raises(IntegrityError, match="weights.bin has SHA-256 .*corrupted or was changed after export"):
        ExportedTransformer(copy)
    # Only an explicit verify=False loads it, and then the output is wrong: the check is what protects.
    kwargs, want = _reference()
    got = ExportedTransformer(copy, policy="none", verify=False)(**kwargs)[0]
    assert (got - want).abs().max().item() > 1e-3


def test_truncated_file_is_refused_with_both_sizes(copy):
    rel = Manifest.load(copy).weights["file"]
    size = (copy / rel).stat().st_size
    truncate(copy / rel)
    with pytest.raises(IntegrityError, match=rf"is {size // 2} bytes; the manifest records {size} bytes \(truncated"):
        ExportedTransformer(copy)


def test_missing_file_is_refused_naming_it(copy):
    rel = _block_file(copy)
    (copy / rel).unlink()
    with pytest.raises(IntegrityError, match=re.escape(str(copy / rel)) + " is missing; the manifest names it"):
        ExportedTransformer(copy)


def test_corrupted_manifest_is_refused(copy):
    path = copy / "manifest.json"
    text = path.read_text()
    # A flip that keeps the JSON valid: the default policy's "every" 2 -> 3 (0x32 ^ 0x01).
    at = text.index('"every"')
    at = text.index("2", at)
    flip_byte(path, at)
    with pytest.raises(IntegrityError, match="manifest.json does not match its own recorded SHA-256"):
        ExportedTransformer(copy)
    flip_byte(path, at)  # back to intact, then a flip that breaks the JSON
    Manifest.load(copy)
    flip_byte(path, text.index("{"))
    with pytest.raises(IntegrityError, match="manifest.json is not valid JSON"):
        ExportedTransformer(copy)


def test_manifest_naming_a_file_outside_the_export_is_refused(copy):
    def escape(raw: dict) -> None:
        raw["weights"]["file"] = "../../etc/passwd"

    rewrite_manifest(copy, escape)
    with pytest.raises(IntegrityError, match="names '../../etc/passwd', which is not a plain path inside the export"):
        ExportedTransformer(copy)


def test_onnx_export_from_other_versions_is_warned_about_and_runs(copy):
    def older(raw: dict) -> None:
        raw["created_with"].update({"torch": "2.11.0", "onnxruntime": "1.20.0"})

    rewrite_manifest(copy, older)
    with pytest.warns(ExportVersionWarning, match=r"torch 2\.11\.0 \(export\) vs .* \(running\); onnxruntime 1\.20\.0"):
        transformer = ExportedTransformer(copy, policy="none")
    kwargs, want = _reference()
    torch.testing.assert_close(transformer(**kwargs)[0], want, rtol=0, atol=1e-5)


def test_intact_export_loads_without_version_warnings(copy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportVersionWarning)
        ExportedTransformer(copy, policy="none")


def test_file_changed_after_construction_is_refused_when_it_is_first_loaded(copy):
    """Stage files load lazily, at their first call: one damaged (or replaced by a re-export)
    after the transformer was built is caught then, not run with the old manifest."""
    transformer = ExportedTransformer(copy, policy="none")
    rel = _block_file(copy)
    flip_byte(copy / rel)
    kwargs, _ = _reference()
    with pytest.raises(IntegrityError, match=re.escape(str(copy / rel)) + " has SHA-256"):
        transformer(**kwargs)
