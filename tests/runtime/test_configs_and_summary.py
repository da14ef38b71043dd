"""Configs through the runtime entry points (``enable``, ``CacheSession``, backend ``options``)
give the same decisions and outputs as the keyword form; ``summary()`` against a known run."""

from __future__ import annotations

import re

import torch

from mixcache_compile import CacheSession, FbCacheConfig, StaticConfig, enable
from mixcache_compile.runtime.summary import human_bytes
from mixcache_compile.policies import DEFAULT_POLICY
from tests.tiny_models import wan

STEPS = 4
OPTIONS = {"threshold": 5.0, "Fn": 1, "Bn": 1, "max_cached": 2}  # any finite probe skips, at most twice in a row


def _run(call, steps: int = STEPS, context=None) -> list[torch.Tensor]:
    """A CFG loop of ``steps`` steps (cond then uncond), the step given by ``context``."""
    _, make = wan()
    cond, uncond = make(1, seed=1), make(1, seed=2)
    outs = []
    with torch.no_grad():
        for step in range(steps):
            latent = make(1, seed=10 + step)["hidden_states"]
            t = torch.tensor([900.0 - 120 * step])
            for branch, inputs in (("cond", cond), ("uncond", uncond)):
                kwargs = {**inputs, "hidden_states": latent, "timestep": t}
                if context is None:
                    outs.append(call(**kwargs)[0])
                else:
                    with context(branch, step_index=step, num_inference_steps=steps):
                        outs.append(call(**kwargs)[0])
    return outs


def _compiled(session=None, **options):
    model, _ = wan()
    opts = {"engine": "eager", "repeated_blocks": ["WanTransformerBlock"], **options}
    if session is not None:
        opts["session"] = session
    return torch.compile(model, backend="mixcache", options=opts, fullgraph=True)


def _decisions(session: CacheSession) -> list[tuple]:
    return [(e.step, e.branch, e.action, e.requested, e.fallback) for e in session.trace]


def test_enable_and_session_take_a_config_like_the_keyword_form():
    """``enable(model, cfg)`` (which builds ``CacheSession(cfg)``) decides exactly as the keyword form."""
    sessions, outputs = [], []
    for args, kwargs in (((FbCacheConfig(**OPTIONS),), {}), (("fbcache",), OPTIONS)):
        model, _ = wan()
        session = enable(model, *args, engine="eager", **kwargs)
        outputs.append(_run(session.compiled, context=session.context))
        sessions.append(session)
    assert sessions[0].policy.config == sessions[1].policy.config == FbCacheConfig(**OPTIONS)
    assert _decisions(sessions[0]) == _decisions(sessions[1])
    kinds = [e.action for e in sessions[0].trace if e.branch == "cond"]
    assert kinds == ["FULL", "BLOCK(1-2)", "BLOCK(1-2)", "FULL"]  # threshold and max_cached=2 reached the policy
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_backend_policy_option_takes_a_config():
    # The backend's own session tracks steps from the timestep input (no context needed), as
    # the explicit session does here, so the two runs make the same decisions.
    session = CacheSession(FbCacheConfig(**OPTIONS))
    reference = _run(_compiled(session))
    via_options = _run(_compiled(policy=FbCacheConfig(**OPTIONS)))
    assert [e.action for e in session.trace if e.branch == "cond"] == ["FULL", "BLOCK(1-2)", "BLOCK(1-2)", "FULL"]
    assert all(torch.equal(a, b) for a, b in zip(reference, via_options))
    model, _ = wan()
    uncached = _run(model)  # plain eager: the outputs above differ from it, so caching ran
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(via_options, uncached))


# A known run: 4 steps, 3 blocks. Step 0 asks "step" with nothing cached (both branches fall
# back to FULL); step 1 rebuilds uncond from the CFG difference of step 0; step 2 reuses both
# outputs; step 3 skips blocks 1-2 on both branches.
SCHEDULE = {0: "step", (1, "uncond"): "cfg", 2: "step", 3: "block:1-3"}
EXPECTED = {  # branch -> (calls, FULL, STEP, CFG, BLOCK)
    "cond": (4, 2, 1, 0, 1),
    "uncond": (4, 1, 1, 1, 1),
    "all": (8, 3, 2, 1, 2),
}


def _table(text: str) -> dict[str, dict[str, str]]:
    lines = text.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["branch", "calls"])
    header = lines[header_at].split()
    rows = {}
    for line in lines[header_at + 1:]:
        cells = line.split()
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_summary_of_a_known_run():
    session = CacheSession(StaticConfig(schedule=SCHEDULE))
    _run(_compiled(session), steps=4, context=session.context)
    text = session.summary()
    stats = session.stats()
    assert text.splitlines()[0] == "mixcache session: policy static(schedule={0: STEP, (1, 'uncond'): CFG, 2: STEP, 3: BLOCK(1-3)})"
    assert f"calls 8, steps 4, generations 1; computed fraction {stats['computed_fraction']:.3f}" in text
    rows = _table(text)
    assert set(rows) == set(EXPECTED)
    for branch, (calls, full, step, cfg, block) in EXPECTED.items():
        row = rows[branch]
        assert (int(row["calls"]), int(row["FULL"]), int(row["STEP"]), int(row["CFG"]), int(row["BLOCK"])) == (calls, full, step, cfg, block)
        assert row["reused"] == f"{(calls - full) / calls:.0%}"
    assert "ATTN" not in text.splitlines()[2]  # kinds never run get no column
    assert "fallbacks: 2 call(s) computed in full" in text
    assert re.search(r"^\s+2\s+STEP\s+-> FULL: no cached output for this branch$", text, re.M)
    assert f"cache memory: {human_bytes(stats['cache_bytes'])} held, {human_bytes(stats['cache_peak_bytes'])} peak" in text
    assert stats["cache_bytes"] > 0


def test_summary_before_any_call_and_after_reset_stats():
    session = CacheSession(FbCacheConfig(threshold=0.2))
    text = session.summary()
    assert text.splitlines()[0] == "mixcache session: policy fbcache(threshold=0.2)"
    assert "no calls yet" in text and "fallbacks: none" in text
    assert CacheSession().summary().splitlines()[0] == f"mixcache session: policy {DEFAULT_POLICY} (defaults)"
    assert CacheSession("none").summary().splitlines()[0] == "mixcache session: policy none (defaults)"


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 1024**2 + 1, 3 * 1024**3)] == ["0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3.0 GiB"]
