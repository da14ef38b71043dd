"""Attention steps as partial steps of sparse step schedules (issue #13, 28 dB level on ``deep``).

Question: the 28 dB level of ``deep``'s fresh set needs 28 dB for at most 0.1397 of the compute,
less than 7 full steps (0.1400). Does an *attention step* (the calls computed with every
block's self-attention output taken from the branch's last full step: the runtime's ATTN
action, ~0.61 of a full step on ``deep``) in place of one full step get there? Letters, on
top of ``cfg_schedule_sim.Simulator``'s ``F`` / ``H`` / ``S``:

  ``A`` attention step: both calls, each block's ``attn1`` output replaced by the one the same
        block made at the branch's last full step.
  ``G`` composite: the cond call as in ``A``, the uncond rebuilt as in ``H`` (the extrapolated
        guidance difference of the last two full steps).

Skips extrapolate from full steps only, as the policy does. The computation still runs in the
simulator (its outputs are replaced by a forward hook); ``cost`` counts what the runtime's
variant runs, from FLOPs counted with ``FlopCounterMode`` (``attn_step_share``).

Usage (1 thread): ``PYTHONPATH=. python tools/attn_fill_sim.py --model deep --sets fresh,eval,third
--schedules docs/experiments/attn_fill_schedules.json --out docs/experiments/attn_fill_deep.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_fill_sim import DAMPING  # noqa: E402
from block_fill_sim import SETS as BLOCK_SETS  # noqa: E402
from cfg_schedule_sim import Simulator, make  # noqa: E402

THIRD_PROMPTS = ("yellow circle moving up", "blue square moving left", "red circle moving down", "green square moving left",
                 "yellow square moving down", "blue circle moving right")  # README's third held-out set
# the frontier's three held-out sets ("wide" in block_fill_sim is the frontier's eval set)
SETS = {"eval": BLOCK_SETS["wide"], "fresh": BLOCK_SETS["fresh"], "third": [(p, s) for p in THIRD_PROMPTS for s in (3000, 3001)]}


class AttnSimulator(Simulator):
    def __init__(self, name: str, samples: list[tuple[str, int]], **kw: Any) -> None:
        # (sample, prefix, branch) -> each block's attn1 output at a full call; not evicted with the
        # output memo (a run scores a few hundred schedules at most: small next to the memo)
        self._attn: dict[tuple, list[torch.Tensor]] = {}
        self._hook_mode: tuple[str, list[torch.Tensor]] | None = None  # ("record" | "replay", outputs)
        super().__init__(name, samples, **kw)
        for k, block in enumerate(self.pipe.transformer.blocks):
            block.attn1.register_forward_hook(self._attn_hook(k))

    def _attn_hook(self, k: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self._hook_mode is None:
                return None
            kind, outputs = self._hook_mode
            if kind == "record":
                outputs.append(out)
                return None
            return outputs[k]
        return hook

    def _hooked_call(self, mode: tuple[str, list[torch.Tensor]], sample: int, prefix: str, branch: str,
                     latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._hook_mode = mode
        try:
            return self._call(sample, prefix, branch, latents, t)
        finally:
            self._hook_mode = None

    def _full(self, sample: int, prefix: str, branch: str, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (sample, prefix, branch)
        if key in self._cache and key in self._attn:
            return self._call(sample, prefix, branch, latents, t)
        self._cache.pop(key, None)  # recompute: the attention outputs are recorded on the way
        recorded: list[torch.Tensor] = []
        out = self._hooked_call(("record", recorded), sample, prefix, branch, latents, t)
        self._attn[key] = recorded
        return out

    def run_sample(self, sample: Any, schedule: str, skip_mode: str = "full", half_mode: str = "extrapolated") -> torch.Tensor:
        if not isinstance(sample, int):  # the reference run of Simulator.__init__ (all F)
            return super().run_sample(sample, schedule, skip_mode, half_mode)
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.steps, device="cpu")
        scheduler.set_begin_index(0)
        latents = self.samples[sample].latents.clone()
        full: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # last two full steps: (i, c, u)
        attn: dict[str, list[torch.Tensor]] = {}
        for i, t in enumerate(scheduler.timesteps):
            letter, prefix = schedule[i], schedule[: i + 1]
            if letter == "F":
                c = self._full(sample, prefix, "cond", latents, t)
                u = self._full(sample, prefix, "uncond", latents, t)
                attn = {b: self._attn[(sample, prefix, b)] for b in ("cond", "uncond")}
                full = [*full, (i, c, u)][-2:]
            elif letter in "AG":
                c = self._hooked_call(("replay", attn["cond"]), sample, prefix, "cond", latents, t)
                if letter == "A":
                    u = self._hooked_call(("replay", attn["uncond"]), sample, prefix, "uncond", latents, t)
                else:
                    u = c - self._extrapolate([(j, cj - uj) for j, cj, uj in full], i)
            elif letter == "H":
                c = self._call(sample, prefix, "cond", latents, t)
                u = c - self._extrapolate([(j, cj - uj) for j, cj, uj in full], i)
            elif letter == "S":
                c, u = self.skipped(full, i)
            else:
                raise ValueError(f"unknown schedule letter {letter!r}")
            latents = scheduler.step(u + self.guidance * (c - u), t, latents, return_dict=False)[0]
        return latents.clamp(-1.0, 1.0)


def attn_step_share(sim: AttnSimulator) -> float:
    """FLOPs of an attention-step call over a full call's: 1 - (the blocks' attn1 FLOPs) / total."""
    from torch.utils.flop_counter import FlopCounterMode

    s, t = sim.samples[0], torch.tensor(sim.timesteps[len(sim.timesteps) // 5])
    with FlopCounterMode(display=False) as whole:
        sim._eager(s, "cond", s.latents, t)
    inner: list[FlopCounterMode] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        inner.append(FlopCounterMode(display=False))
        inner[-1].__enter__()

    def leave(module: torch.nn.Module, args: Any, out: Any) -> None:
        inner[-1].__exit__(None, None, None)

    hooks = []
    for block in sim.pipe.transformer.blocks:
        hooks += [block.attn1.register_forward_pre_hook(enter), block.attn1.register_forward_hook(leave)]
    try:
        sim._eager(s, "cond", s.latents, t)
    finally:
        for h in hooks:
            h.remove()
    return 1.0 - sum(c.get_total_flops() for c in inner) / whole.get_total_flops()


def cost(schedule: str, share: float) -> float:
    """Computed fraction (probes aside): F = 1, A = share, H = 1/2, G = share/2, S = 0 per step."""
    per = {"F": 1.0, "A": share, "H": 0.5, "G": share / 2, "S": 0.0}
    return sum(per[letter] for letter in schedule) / len(schedule)


def build(steps: int, spec: dict[str, list[int]]) -> str:
    """A schedule from ``{"F": [...], "A": [...], "G": [...], "H": [...]}`` (the rest ``S``)."""
    letters = list(make(steps, spec["F"]))
    for letter in "AGH":
        for position in spec.get(letter, []):
            letters[position] = letter
    return "".join(letters)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deep")
    p.add_argument("--sets", default="fresh,eval,third")
    p.add_argument("--schedules", type=Path, required=True, help="JSON {label: {F: [...], A: [...], ...}}")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    specs = json.loads(a.schedules.read_text())
    result: dict[str, Any] = {"model": a.model, "schedules": specs, "scores": {}}
    for name in a.sets.split(","):
        start = time.time()
        sim = AttnSimulator(a.model, SETS[name], damping=DAMPING[a.model])
        result.setdefault("attn_step_share", attn_step_share(sim))
        share = result["attn_step_share"]
        for label, spec in specs.items():
            schedule = build(sim.steps, spec)
            score = sim.score(schedule)[0]
            result["scores"].setdefault(label, {"cost": cost(schedule, share)})[name] = score
            print(f"{name:6s} {label:26s} {score:6.2f} dB  cost {cost(schedule, share):.4f}  ({time.time() - start:.0f} s)", flush=True)
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
