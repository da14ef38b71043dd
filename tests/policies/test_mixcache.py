"""mixcache: equals an independent eager reference call by call (tiny Wan, separate CFG, 50
steps; tiny CogVideoX, batched CFG); uses step, CFG and block reuse in one run; never reuses
an approximated tensor; warm-up and final steps compute; calibration round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mixcache_compile import CacheSession
from tests.eager_reference import two_stream_adapter, wan_adapter
from tests.policies.harness import drive_batched, drive_separate
from tests.policies.reference import Probe, Reference
from tests.tiny_models import cogvideox, wan

N = 3
RANGE = (1, 2)  # Fn = Bn = 1 on a 3-block model


class MixRule:
    """MixCache's decisions restated from the module docstring of ``policies/mixcache.py``.

    Provenance of what the runtime holds: ``out_src[b]`` ("full" or "approx") for the last
    recorded output of each branch, ``delta_src`` for the stored CFG difference; ``dist`` are
    the last distances between two fresh copies; the plan is made at the first call of a step.
    """

    def __init__(self, steps: int, *, tau: float, sens: dict, d1: float, d2: float, guard: float | None,
                 warmup: float = 0.2, final: int = 2, interval: int = 2, lo: int = 1, hi: int = 4, penalty: float = 5.0,
                 half_batch: bool = True) -> None:
        self.T, self.tau, self.d1, self.d2, self.guard = steps, tau, d1, d2, guard
        top = max(sens.values())
        self.I = {g: v / top for g, v in sens.items()}
        self.W, self.final, self.interval, self.lo, self.hi, self.penalty = math.ceil(warmup * steps), final, interval, lo, hi, penalty
        self.half_batch = half_batch
        self.out_src: dict[str, str] = {}
        self.has_res: set[str] = set()
        self.delta_src: str | None = None
        self.dist: dict[str, dict] = {"step": {}, "block": {}}
        self.dist_cfg: float | None = None
        self.on: set[str] = set()
        self.plans: dict[int, str | None] = {}
        self.last_cached: str | None = None
        self.run: list[str] = []
        self.refresh_of: set[str] | None = None
        self.seen_devs: dict[int, dict[str, float]] = {}
        self.kinds_now: dict[int, dict[str, str]] = {}

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, step: int) -> str | None:
        if self.refresh_of:
            devs = self.seen_devs.get(step - 1, {})
            errs = [devs[g] * self.I[g] for g in self.refresh_of if g in devs]
            if errs and max(errs) > self.d2:
                self.interval = max(self.lo, self.interval - 1)
            elif errs and max(errs) < self.d1:
                self.interval = min(self.hi, self.interval + 1)
        self.refresh_of = None
        if step >= self.W:
            self.on |= {b for b, d in self.dist["step"].items() if d < self.tau}
        branches = set(self.out_src)
        prev = self.plans.get(step - 1)
        choice = None
        if self.W <= step < self.T - self.final and len(self.run) < self.interval and branches:
            scores = {}
            everyone = branches <= self.on
            if prev != "step" and everyone and all(self.out_src[b] == "full" for b in branches) and set(self.dist["step"]) >= branches:
                scores["step"] = max(self.dist["step"][b] for b in branches)
            k = "uncond" if {"cond", "uncond"} <= branches else ("batch" if "batch" in branches and self.half_batch else None)
            if k in self.on and self.delta_src == "full" and self.dist_cfg is not None:
                scores["cfg"] = self.dist_cfg
            if prev != "step" and everyone and self.has_res >= branches and set(self.dist["block"]) >= branches:
                scores["block"] = max(self.dist["block"][b] for b in branches)
            scores = {g: d * self.I[g] * (self.penalty if g == self.last_cached else 1) for g, d in scores.items()}
            if scores:
                best = min(scores.values())
                choice = next(g for g in ("step", "cfg", "block") if scores.get(g) == best)
        if choice is None:
            if self.run:
                self.refresh_of = set(self.run)
            self.run = []
        else:
            self.run.append(choice)
            self.last_cached = choice
        return choice

    def action(self, step, branch, computed):
        if step not in self.plans:
            self.plans[step] = self._plan(step)
        plan = self.plans[step]
        ready = branch in self.on
        if ready and plan == "step" and self.out_src.get(branch) == "full":
            return "step"
        if ready and plan == "cfg" and (branch == "batch" or (branch == "uncond" and "cond" in computed)):
            return "cfg"
        return "probe" if self.guard is not None else (f"block:{RANGE[0]}-{RANGE[1]}" if ready and plan == "block" and branch in self.has_res else "full")

    def after_probe(self, step, branch, indicator):
        if self.plans[step] == "block" and branch in self.on and branch in self.has_res and indicator <= self.guard:
            return f"block:{RANGE[0]}-{RANGE[1]}"
        return "full"

    # -- what happened ------------------------------------------------------------------------
    def observe(self, step, branch, result):
        kind, devs = result.action.split(":")[0], result.deviations
        seen = self.seen_devs.setdefault(step, {})
        now = self.kinds_now.setdefault(step, {})
        if kind == "full":
            if self.out_src.get(branch) == "full" and "step" in devs:
                self.dist["step"][branch] = devs["step"]
                seen["step"] = max(seen.get("step", 0.0), devs["step"])
            key = f"block:{RANGE[0]}-{RANGE[1]}"
            if key in devs:
                self.dist["block"][branch] = devs[key]
                seen["block"] = max(seen.get("block", 0.0), devs[key])
            self.has_res.add(branch)
        if kind in ("full", "block", "cfg"):
            self.out_src[branch] = "full" if kind == "full" else "approx"
        if kind in ("full", "block"):
            now[branch] = kind
            if branch == "batch" or (branch == "uncond" and "cond" in now):
                fresh = kind == "full" and (branch == "batch" or now["cond"] == "full")
                if fresh and self.delta_src == "full" and "cfg" in devs:
                    self.dist_cfg = devs["cfg"]
                    seen["cfg"] = max(seen.get("cfg", 0.0), devs["cfg"])
                self.delta_src = "full" if fresh else "approx"


def assert_never_reuses_approximations(trace) -> None:
    """From the trace alone: STEP reuses an output recorded by a FULL call; CFG reuses a
    difference taken when both branches computed in full; after a STEP the next step's cond
    (or batch) call computes."""
    last_recorded: dict[str, str] = {}
    delta_ok: bool | None = None
    kinds: dict[int, dict[str, str]] = {}
    for e in trace:
        kind = e.action.split("(")[0]
        if kind == "STEP":
            assert last_recorded.get(e.branch) == "FULL", (e.step, e.branch)
        if kind == "CFG":
            assert delta_ok, (e.step, e.branch)
        if kind in ("FULL", "BLOCK", "CFG"):
            last_recorded[e.branch] = kind
        now = kinds.setdefault(e.step, {})
        if kind in ("FULL", "BLOCK"):
            now[e.branch] = kind
            if e.branch == "batch" or (e.branch == "uncond" and "cond" in now):
                delta_ok = kind == "FULL" and (e.branch == "batch" or now["cond"] == "FULL")
        if e.branch in ("cond", "batch") and kinds.get(e.step - 1, {}).get(e.branch) is None and e.step > 0:
            prev = [x for x in trace if x.step == e.step - 1 and x.branch == e.branch]
            if prev and prev[0].action == "STEP":
                assert kind in ("FULL", "CFG") and (kind == "FULL" or e.branch == "batch"), (e.step, e.branch, kind)


def _granularities(trace) -> set[str]:
    return {e.action.split("(")[0] for e in trace} - {"FULL"}


def test_separate_cfg_50_steps_matches_reference_and_mixes_all_granularities():
    steps = 50
    opts = dict(tau=0.3, sensitivities={"step": 0.5, "cfg": 1.0, "block": 1.0}, delta1=0.1, delta2=0.25, block_guard=0.06)
    model, make = wan()
    session = CacheSession("mixcache", **opts)
    rule = MixRule(steps, tau=0.3, sens=opts["sensitivities"], d1=0.1, d2=0.25, guard=0.06)
    ref = Reference(model, wan_adapter(model), watch_ranges=[RANGE], probe=Probe("blocks", 1, "always"))
    drive_separate(model, make, session, ref, rule, steps)
    trace = session.trace
    assert _granularities(trace) == {"STEP", "CFG", "BLOCK"}
    assert all(e.action == "FULL" for e in trace if e.step < 10 or e.step >= steps - 2)  # warm-up 20 %, last 2
    assert_never_reuses_approximations(trace)
    # the guard turned some planned block steps into full calls; the interval adapted
    planned_block = {d.step for d in session.policy.log if d.granularity == "block"}
    assert any(e.action == "FULL" for e in trace if e.step in planned_block)
    assert len({d.interval for d in session.policy.log}) > 1
    assert not session.stats()["fallbacks"]
    assert session.stats()["computed_fraction"] < 0.85


def test_batched_cfg_matches_reference():
    steps = 30
    model, make = cogvideox()
    opts = dict(tau=0.5, sensitivities={"step": 0.3, "cfg": 1.0, "block": 0.6}, delta1=0.05, delta2=0.2, block_guard=None, interval=3)
    session = CacheSession("mixcache", cfg="batched", **opts)
    rule = MixRule(steps, tau=0.5, sens=opts["sensitivities"], d1=0.05, d2=0.2, guard=None, interval=3)
    ref = Reference(model, two_stream_adapter(model), watch_ranges=[RANGE])
    drive_batched(model, make, session, ref, rule, steps)
    assert _granularities(session.trace) == {"STEP", "CFG", "BLOCK"}
    assert_never_reuses_approximations(session.trace)
    assert not session.stats()["fallbacks"]


def test_options_validated_and_calibration_file(tmp_path):
    from mixcache_compile.policies import make_policy
    from mixcache_compile.policies.mixcache import DEFAULT_SENSITIVITIES

    policy = make_policy("mixcache")
    assert policy.sensitivities == {g: v / max(DEFAULT_SENSITIVITIES.values()) for g, v in DEFAULT_SENSITIVITIES.items()}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"format": 1, "sensitivities": {"step": 2.0, "cfg": 1.0, "block": 0.5}}))
    assert make_policy("mixcache", calibration=str(path)).sensitivities == {"step": 1.0, "cfg": 0.5, "block": 0.25}
    with pytest.raises(ValueError, match="either"):
        make_policy("mixcache", calibration=str(path), sensitivities={"step": 1.0})
    with pytest.raises(ValueError, match="unknown granularities"):
        make_policy("mixcache", sensitivities={"attn": 1.0})
    with pytest.raises(ValueError, match="delta1"):
        make_policy("mixcache", delta1=0.5, delta2=0.1)
    with pytest.raises(ValueError, match="interval"):
        make_policy("mixcache", interval=9)
    with pytest.raises(ValueError, match="warmup"):
        make_policy("mixcache", warmup=1.5)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        make_policy("mixcache", calibration=str(tmp_path / "missing.json"))


def test_calibrate_tiny_pipeline_round_trip(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from mixcache_compile.policies import make_policy
    from mixcache_compile.policies.calibration import calibrate, save

    model, _ = wan()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(100)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                  height=64, width=64, num_frames=5, num_inference_steps=8, guidance_scale=5.0)
    with torch.no_grad():
        before = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    result = calibrate(pipe, kwargs, noise=0.1, at=(0.5,))
    assert result["num_steps"] == 8
    assert set(result["sensitivities"]) == {"step", "cfg", "block"}
    assert max(result["sensitivities"].values()) == 1.0 and all(v > 0 for v in result["raw"].values())
    with torch.no_grad():  # the hooks are gone: the pipeline is unchanged
        after = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    path = tmp_path / "cal.json"
    save(result, path)
    assert make_policy("mixcache", calibration=path).sensitivities == pytest.approx(result["sensitivities"])



def tiny_wan_pipeline():
    """Factory for ``mixcache calibrate --model tests.policies.test_mixcache:tiny_wan_pipeline``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = wan()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(100)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                  height=64, width=64, num_frames=5, guidance_scale=5.0)
    return pipe, kwargs


def test_calibrate_command_line(tmp_path, capsys):
    from mixcache_compile.policies.calibration import load, main

    out = tmp_path / "tiny.json"
    assert main(["--model", "tests.policies.test_mixcache:tiny_wan_pipeline", "--steps", "4", "--at", "0.5", "--mode", "reuse", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["num_steps"] == 4 and data["format"] == 1 and data["mode"] == "reuse"
    assert all(v > 0 for v in data["raw"].values())
    assert load(out) == data["sensitivities"]
    assert "wrote" in capsys.readouterr().out
