"""Lock-step driver: the compiled model under a policy and the eager reference under an
independently written decision rule see the same inputs call by call; every call must take
the same action and give the same output (1e-5).

A *rule* (one per policy, in the test files) is the reference's decision logic:
  action(step, branch, computed_this_step) -> "full" | "step" | "cfg" | "block:a-b" | "attn:..." | "probe"
  after_probe(step, branch, indicator) -> action      (rules that probe)
  observe(step, branch, result)                        (optional)
  rebuild(step, branch) -> callable(cond, delta) | None; attn_value(step, branch) -> callable | None
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mixcache_compile import CacheSession
from tests.policies.reference import Reference

TOL = 1e-5


def compile_model(model: torch.nn.Module, session: CacheSession, **options: Any):
    return torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager", **options}, fullgraph=True)


def trace_action(text: str) -> str:
    """The session trace's spelling ("BLOCK(1-3)") in the reference's ("block:1-3")."""
    return text.lower().replace("(", ":").replace(")", "")


def _check_call(session, ref: Reference, rule, step: int, branch: str, kwargs: dict, got: torch.Tensor, computed: set[str], log: list) -> Any:
    action = rule.action(step, branch, frozenset(computed))
    result = ref.call(
        step, branch, action, kwargs,
        rebuild=getattr(rule, "rebuild", lambda s, b: None)(step, branch),
        attn_value=getattr(rule, "attn_value", lambda s, b: None)(step, branch),
        after_probe=(lambda ind: rule.after_probe(step, branch, ind)) if action == "probe" else None,
        step_value=getattr(rule, "step_value", lambda s, b: None)(step, branch),
    )
    entry = session.trace[-1]
    assert (entry.step, entry.branch) == (step, branch)
    assert trace_action(entry.action) == result.action, (step, branch, entry.action, result.action)
    assert entry.fallback is None, (step, branch, entry.fallback)
    if result.indicator is not None:
        both_inf = math.isinf(result.indicator) and entry.indicator is not None and math.isinf(entry.indicator)
        assert both_inf or abs(entry.indicator - result.indicator) <= 1e-4 * max(1.0, abs(result.indicator)), (step, branch, entry.indicator, result.indicator)
    err = (got - result.output).abs().max().item()
    assert err <= TOL, (step, branch, result.action, err)
    if hasattr(rule, "observe"):
        rule.observe(step, branch, result)
    if result.action not in ("step", "cfg"):
        computed.add(branch)
    log.append((step, branch, result.action))
    return result


@torch.no_grad()
def drive_separate(model, make, session, ref: Reference, rule, steps: int, guidance: float = 4.0, repeated: bool = True, report_steps: bool = True) -> list:
    """Tiny Wan, one call per branch (cond then uncond), contexts give step and branch."""
    compiled = compile_model(model, session, **({"repeated_blocks": ["WanTransformerBlock"]} if repeated else {}))
    inputs = {"cond": make(1, seed=1), "uncond": make(1, seed=2)}
    latent = make(1, seed=3)["hidden_states"]
    log: list = []
    for i in range(steps):
        t = torch.tensor([999.0 * (1 - i / steps)])
        outs, computed = {}, set()
        for branch in ("cond", "uncond"):
            kwargs = {**inputs[branch], "hidden_states": latent, "timestep": t}
            with session.context(branch, step_index=i, num_inference_steps=steps if report_steps else None):
                outs[branch] = compiled(**kwargs)[0]
            _check_call(session, ref, rule, i, branch, kwargs, outs[branch], computed, log)
        velocity = outs["uncond"] + guidance * (outs["cond"] - outs["uncond"])
        latent = latent - velocity / steps
    return log


@torch.no_grad()
def drive_batched(model, make, session, ref: Reference, rule, steps: int, guidance: float = 4.0) -> list:
    """Tiny CogVideoX, both branches in one call (uncond half first), batch dim dynamic."""
    compiled = compile_model(model, session)
    base = make(2, seed=1)
    latent = make(1, seed=3)["hidden_states"]
    log: list = []
    for i in range(steps):
        kwargs = {**base, "hidden_states": latent.repeat(2, 1, 1, 1, 1), "timestep": torch.full((2,), int(999 * (1 - i / steps)))}
        for name in ("hidden_states", "encoder_hidden_states", "timestep"):
            torch._dynamo.mark_dynamic(kwargs[name], 0)
        with session.context(step_index=i, num_inference_steps=steps):
            got = compiled(**kwargs)[0]
        _check_call(session, ref, rule, i, "batch", kwargs, got, set(), log)
        uncond, cond = got.chunk(2)
        latent = latent - (uncond + guidance * (cond - uncond)) / steps
    return log
