"""Block steps as fills of a sparse step schedule (issue #13, 28 dB level on ``deep``).

Question: between the few fully computed steps of a 6-7 step schedule, is a cheap *block step*
(both calls compute the first ``Fn`` and last ``Bn`` blocks; the middle blocks' residual comes
from the branch's last full step) a better use of a few percent of compute than one more full
step? Letters, on top of ``cfg_schedule_sim.Simulator``'s ``F`` / ``S``:

  ``B`` block step: the middle residual of each branch held from its last full step.
  ``E`` block step: the middle residual extrapolated from the branch's last two full steps with
        mixcache's weight (``Simulator.weight``).
  ``C`` / ``D``: ``B`` / ``E`` whose outputs also feed the extrapolation of the skipped steps
        after them (a chained approximation: the outputs are partly fresh).

A block step is a fresh computation of the model's ends on the current sample, so it obeys
"no chained approximations" (it reads only caches full calls recorded); the skipped steps
after it extrapolate from the full steps only (``skip_mode="full"``), as the policy does.

Usage (1 thread): ``PYTHONPATH=. python tools/block_fill_sim.py --model deep --out out/block_fill_deep.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cfg_schedule_search import CALIBRATION  # noqa: E402
from cfg_schedule_sim import Simulator, make  # noqa: E402

from mixcache_compile.eval.frontier import EVAL_PROMPTS, EVAL_SEEDS, FRESH_PROMPTS, FRESH_SEEDS  # noqa: E402

SETS = {"cal": CALIBRATION, "wide": [(p, s) for p in EVAL_PROMPTS for s in EVAL_SEEDS],
        "fresh": [(p, s) for p in FRESH_PROMPTS for s in FRESH_SEEDS]}
STARTS = {"deep": (0, 23, 32, 41, 45, 48), "tiny": (0, 18, 30, 37, 43, 46, 48)}
DAMPING = {"deep": 0.5, "tiny": 0.25}


class _HeldResidual(torch.nn.Module):
    """Stands in for the middle blocks: adds the residual they made at a full step."""

    def __init__(self, residual: torch.Tensor) -> None:
        super().__init__()
        self.residual = residual

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states + self.residual


class BlockSimulator(Simulator):
    def __init__(self, name: str, samples: list[tuple[str, int]], fn: int = 1, bn: int = 1, **kw: object) -> None:
        self.fn, self.bn = fn, bn
        # (sample, prefix, branch) -> middle residual of a full call; not evicted with the output
        # memo (one hidden-state tensor per full call: a greedy search makes a few thousand)
        self._residuals: dict[tuple, torch.Tensor] = {}
        super().__init__(name, samples, **kw)

    def _middle(self) -> tuple[int, int]:
        return self.fn, len(self.pipe.transformer.blocks) - self.bn

    def _call(self, sample_index: int, prefix: str, branch: str, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A full call that also records the middle blocks' residual (memoised with the output)."""
        key = (sample_index, prefix, branch)
        if key in self._cache and key in self._residuals:
            return super()._call(sample_index, prefix, branch, latents, t)
        blocks = self.pipe.transformer.blocks
        a, b = self._middle()
        seen: dict[str, torch.Tensor] = {}
        h1 = blocks[a].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]))
        h2 = blocks[b - 1].register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
        try:
            self._cache.pop(key, None)
            out = super()._call(sample_index, prefix, branch, latents, t)
        finally:
            h1.remove()
            h2.remove()
        self._residuals[key] = seen["out"] - seen["in"]
        return out

    def _block_call(self, sample_index: int, prefix: str, branch: str, latents: torch.Tensor, t: torch.Tensor,
                    residual: torch.Tensor) -> torch.Tensor:
        key = (sample_index, prefix, branch)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        tr = self.pipe.transformer
        blocks = tr.blocks
        a, b = self._middle()
        tr.blocks = torch.nn.ModuleList([*blocks[:a], _HeldResidual(residual), *blocks[b:]])
        try:
            out = super()._call(sample_index, prefix, branch, latents, t)
        finally:
            tr.blocks = blocks
        return out

    def run_sample(self, sample: object, schedule: str, skip_mode: str = "full", half_mode: str = "extrapolated") -> torch.Tensor:
        if not isinstance(sample, int):  # the reference run of Simulator.__init__
            sample = next(k for k, x in enumerate(self.samples) if x is sample)
        s = self.samples[sample]
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.steps, device="cpu")
        scheduler.set_begin_index(0)
        latents = s.latents.clone()
        full: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        res: dict[str, list[tuple[int, torch.Tensor]]] = {"cond": [], "uncond": []}
        for i, t in enumerate(scheduler.timesteps):
            letter, prefix = schedule[i], schedule[: i + 1]
            if letter == "F":
                outs = {}
                for branch in ("cond", "uncond"):
                    outs[branch] = self._call(sample, prefix, branch, latents, t)
                    res[branch] = [*res[branch], (i, self._residuals[(sample, prefix, branch)])][-2:]
                c, u = outs["cond"], outs["uncond"]
                full = [*full, (i, c, u)][-2:]
            elif letter in "BECD":
                outs = {}
                for branch in ("cond", "uncond"):
                    r = self._extrapolate(res[branch], i, plain=letter in "BC")
                    outs[branch] = self._block_call(sample, prefix, branch, latents, t, r)
                c, u = outs["cond"], outs["uncond"]
                if letter in "CD":  # the block step's outputs feed the later skips' extrapolation
                    full = [*full, (i, c, u)][-2:]
            elif letter == "S":
                c, u = self.skipped(full, i)
            else:
                raise ValueError(f"unknown letter {letter!r}")
            latents = scheduler.step(u + self.guidance * (c - u), t, latents, return_dict=False)[0]
        return latents.clamp(-1.0, 1.0)


def block_step_share(sim: BlockSimulator) -> float:
    """FLOPs of a block step over a full step's (one call each, counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    s = sim.samples[0]
    t = torch.tensor(sim.timesteps[len(sim.timesteps) // 5])
    counts = []
    for block in (False, True):
        with FlopCounterMode(display=False) as counter:
            if block:
                sim._block_call(0, "share:B", "cond", s.latents, t, torch.zeros(1))
            else:
                sim._call(0, "share:F", "cond", s.latents, t)
        counts.append(counter.get_total_flops())
    for key in [(0, "share:B", "cond"), (0, "share:F", "cond")]:
        sim._cache.pop(key, None)
    return counts[1] / counts[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deep")
    p.add_argument("--max-blocks", type=int, default=8, help="block steps added greedily")
    p.add_argument("--letters", default="B,E")
    p.add_argument("--score-sets", default="wide,fresh")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    damping = DAMPING[a.model]
    sim = BlockSimulator(a.model, CALIBRATION, damping=damping)
    share = block_step_share(sim)
    start = make(sim.steps, STARTS[a.model])
    result = {"model": a.model, "block_step_share": share, "start": start, "searches": {}}
    print(f"block step = {share:.3f} of a full step", flush=True)
    for letter in a.letters.split(","):
        schedule, found = start, [{"schedule": start, "cal": sim.score(start)[0]}]
        for _ in range(a.max_blocks):
            t0 = time.time()
            best = None
            for pos in range(1, sim.steps):
                if schedule[pos] != "S":
                    continue
                cand = schedule[:pos] + letter + schedule[pos + 1:]
                score = sim.score(cand)[0]
                if best is None or score > best[0]:
                    best = (score, cand)
            schedule = best[1]
            found.append({"schedule": schedule, "cal": best[0]})
            print(f"{letter} +{len(found) - 1}: cal {best[0]:.2f} dB  {schedule}  ({time.time() - t0:.0f} s)", flush=True)
        result["searches"][letter] = found
        a.out.write_text(json.dumps(result, indent=1))
    # reference points: 7 and 8 full steps (best known), scored alike
    refs = {"7F": make(sim.steps, (*STARTS[a.model], 49))}
    for name in a.score_sets.split(","):
        other = BlockSimulator(a.model, SETS[name], damping=damping)
        rows = {"start": other.score(start)[0], **{k: other.score(v)[0] for k, v in refs.items()}}
        for letter, found in result["searches"].items():
            for k, f in enumerate(found[1:], 1):
                if k in (2, 4, 6, 8):
                    rows[f"{letter}+{k}"] = other.score(f["schedule"])[0]
        result[name] = rows
        print(name, json.dumps(rows), flush=True)
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
