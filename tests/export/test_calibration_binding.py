"""An export of a shipped model runs that model's mixcache calibration, as ``enable`` does.

The exported transformer holds no parameters (its weights live in the export's files), so
the export records the traced model's weights fingerprint and the loaded transformer answers
it (Note [weights fingerprint], policies/fingerprint.py). Without it the exported session
would silently run the FALLBACK coefficients: other decisions than the model's own session.
"""

from __future__ import annotations

import os

import pytest
import torch

import mixcache_compile
from mixcache_compile.export import ExportedTransformer, Manifest, export
from mixcache_compile.policies.fingerprint import fingerprint
from mixcache_compile.policies.mixcache import CALIBRATION_DIR
from mixcache_compile.zoo import default_call_kwargs, load_pipeline
from tests.export.common import decisions

STEPS = 20  # enough for the shipped calibration to skip steps on this prompt
PROMPT = "blue square moving down"


def _generate(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(1000),
                    **default_call_kwargs(num_inference_steps=STEPS)).frames


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory):
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = tmp_path_factory.mktemp("export-shipped")
    export(pipe, {"prompt": PROMPT, **default_call_kwargs(num_inference_steps=2)}, out)  # default policy
    return out, fingerprint(pipe.transformer)


def test_export_records_the_default_policy_and_the_weights_fingerprint(shipped_export):
    out, weights = shipped_export
    m = Manifest.load(out)
    assert m.policy["name"] == mixcache_compile.policies.DEFAULT_POLICY == "mixcache"
    assert m.model["weights_fingerprint"] == weights != ""


def test_exported_session_takes_the_shipped_calibration_and_the_same_decisions(shipped_export):
    out, _ = shipped_export
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    session = mixcache_compile.enable(pipe, engine="eager")
    want = _generate(pipe)

    ort_pipe = load_pipeline()
    ort_pipe.set_progress_bar_config(disable=True)
    exported = ExportedTransformer(out).install(ort_pipe)
    got = _generate(ort_pipe)

    shipped = os.path.join(CALIBRATION_DIR, "tiny.json")
    assert session.policy.calibration_source == shipped
    assert exported.session.policy.calibration_source == shipped
    assert exported.session.policy.threshold == session.policy.threshold
    assert decisions(exported.session.trace) == decisions(session.trace)
    assert exported.session.stats()["actions"].get("STEP", 0) > 0  # the calibration does reuse here
    assert (got - want).abs().max().item() <= 1e-4


def test_an_export_without_a_recorded_fingerprint_falls_back(shipped_export):
    """Exports made before the fingerprint was recorded match no calibration: FALLBACK, the
    documented default of an uncalibrated model."""
    out, _ = shipped_export
    exported = ExportedTransformer(out, policy="mixcache")
    exported.weights_fingerprint = ""
    exported.session.bind_model(exported)
    assert exported.session.policy.calibration_source == "fallback"
