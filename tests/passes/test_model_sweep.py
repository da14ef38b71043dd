"""Every transformer class of ``diffusers.models.transformers`` with a tiny config: compiled
with the mixcache backend (eager engine, policy none, under ``torch.inference_mode()``), it
either plans or falls back with one warning naming why, never raises, and its outputs
equal the eager model's. Classes without a tiny config are listed, with the reason, in
``tests/tiny_models_sweep.py`` (and README's models table).

Each class is one test case, so pytest-xdist spreads them. Dynamo's trace of a class takes
10-40 s on one core even at tiny dims, so only ``DEFAULT`` (one class per family and every
class that exercises a distinct planner path: graph breaks, interleaved blocks, boolean-mask
ops, several chains) runs in ``make test``; the other classes carry the ``sweep_all`` mark,
which ``make test`` deselects to stay inside CI's 15 minutes (about 4 more minutes on 2
cores) and ``make test-all`` / ``tools/sweep_models.py`` run.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import diffusers.models.transformers as transformers
from mixcache_compile import CacheSession
from mixcache_compile.runtime.entry import install_entry
from tests.tiny_models_sweep import DEFAULT, EXACT_TESTED, NOT_SWEPT, SPECS, build


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return _first_tensor(out.sample)


def sweep_one(name: str) -> tuple[CacheSession, list[str], list[float]]:
    """Compile ``name`` with the backend, call it at two timesteps, return the session, the
    mixcache warnings, and the max abs error of each call against the eager model."""
    model, make = build(name)
    session = CacheSession("none")
    # As enable() does: the model gets its own entry code before compiling, so Dynamo traces
    # it once (the bare backend form traces it twice, see backend._protect_traced_model).
    install_entry(model, session)
    options = {"session": session, "engine": "eager"}
    if getattr(type(model), "_repeated_blocks", None):
        options["repeated_blocks"] = list(type(model)._repeated_blocks)
    compiled = torch.compile(model, backend="mixcache", options=options)
    errors = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (0, 1):
            with torch.inference_mode():
                got = _first_tensor(compiled(**make(seed)))
                want = _first_tensor(model(**make(seed)))
            assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != eager {tuple(want.shape)}"
            errors.append((got.float() - want.float()).abs().max().item())
    mixcache = [str(w.message) for w in caught if str(w.message).startswith("mixcache")]
    return session, mixcache, errors


def _case(name: str):
    marks = [getattr(pytest.mark, m) for m in SPECS[name].marks]
    if name not in DEFAULT:
        marks.append(pytest.mark.sweep_all)
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_case(n) for n in sorted(SPECS)])
def test_each_class_plans_or_falls_back_and_equals_eager(name: str):
    session, mixcache_warnings, errors = sweep_one(name)
    assert max(errors) <= 1e-5, f"{name}: max error {max(errors)}"
    if session._runner is None:
        assert any("not caching this graph" in w for w in mixcache_warnings), f"{name}: no plan and no warning saying why"
    else:
        stats = session.stats()
        assert stats["calls"] >= 2 and stats["computed_fraction"] == 1.0
        # FLOP accounting never breaks a call; where it cannot count a stage, stats() says why.
        expected = SPECS[name].flops_unknown
        if expected:
            assert stats["flops_unknown"] and all(expected in note for note in stats["flops_unknown"].values())
        else:
            assert not stats["flops_unknown"], stats["flops_unknown"]


def test_every_transformer_class_is_swept_or_listed_with_a_reason():
    classes = {n for n in dir(transformers) if n[:1].isupper() and isinstance(getattr(transformers, n), type)}
    accounted = set(SPECS) | EXACT_TESTED | set(NOT_SWEPT)
    assert not classes - accounted, f"transformer classes neither swept nor listed: {sorted(classes - accounted)}"
    assert not set(SPECS) & set(NOT_SWEPT) and not EXACT_TESTED & (set(SPECS) | set(NOT_SWEPT))
    assert all(reason for reason in NOT_SWEPT.values())
    assert DEFAULT <= set(SPECS), sorted(DEFAULT - set(SPECS))
