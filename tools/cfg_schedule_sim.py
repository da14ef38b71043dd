"""Schedule simulator for mixcache's step and CFG reuse (issue #13, 28 dB level).

Runs a shipped model's transformer in eager with a hand-written sampling loop equal to
``WanPipeline.__call__`` (same scheduler, same latents from the seed, separate cond / uncond
calls, CFG ``u + g (c - u)``), where each step follows a *schedule* letter:

  ``F`` full:  both calls computed.
  ``H`` half:  the cond call computed; the uncond rebuilt as ``u = c - d_hat``, ``d = c - u``
               extrapolated from the last two full steps ``i1 < i2`` with mixcache's weight
               ``w = (t_i - t_i2) / (t_i2 - t_i1) / (1 + damping (i - i2 - 1))`` (time = the
               sampler's timesteps; ``w = 0`` with one full step only). ``half_mode="stale"``
               uses ``d_hat = d2`` (the current ``cfg`` candidate, for comparison).
  ``S`` skip:  no call; ``skip_mode="full"`` extrapolates both branches from the last two full
               steps (mixcache's "no chained approximations" rule read strictly);
               ``skip_mode="fresh"`` extrapolates the cond from its last two fresh calls (full
               or half steps: they are fresh computations, not approximations) and the
               difference from the last two full steps.

Cost in half-steps: F = 2, H = 1, S = 0 (a skipped call's probe head is ~0). Computed calls are
memoised by (sample, schedule prefix, branch), so searches that move one position re-run only
the calls after it. The frames are the end point clamped to [-1, 1], like ``TinyWanPipeline``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from mixcache_compile.eval.metrics import psnr
from mixcache_compile.zoo import default_call_kwargs, load_pipeline


@dataclass
class Sample:
    prompt: str
    seed: int
    cond: torch.Tensor  # prompt embeddings
    uncond: torch.Tensor  # negative prompt embeddings
    latents: torch.Tensor  # initial noise
    reference: torch.Tensor | None = None  # the uncached video


class Simulator:
    def __init__(self, name: str, samples: list[tuple[str, int]], steps: int = 50, guidance: float = 5.0,
                 damping: float = 0.25, cache_size: int = 20000) -> None:
        self.pipe = load_pipeline(name=name)
        self.pipe.set_progress_bar_config(disable=True)
        self.steps, self.guidance, self.damping = steps, guidance, damping
        self.kwargs = default_call_kwargs(num_inference_steps=steps, guidance_scale=guidance)
        self.samples = [self._prepare(p, s) for p, s in samples]
        self.pipe.scheduler.set_timesteps(steps, device="cpu")
        self.timesteps = [float(t) for t in self.pipe.scheduler.timesteps]
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.calls_run = 0
        for sample in self.samples:
            sample.reference = self.run_sample(sample, "F" * steps)

    def _prepare(self, prompt: str, seed: int) -> Sample:
        pipe, kw = self.pipe, self.kwargs
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompt=prompt, negative_prompt=kw["negative_prompt"],
                                              do_classifier_free_guidance=True, num_videos_per_prompt=1,
                                              max_sequence_length=kw["max_sequence_length"], device=torch.device("cpu"))
        # TinyWanPipeline passes num_frames - 1, which WanPipeline rounds back up to num_frames.
        latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, kw["height"], kw["width"],
                                       kw["num_frames"], torch.float32, torch.device("cpu"),
                                       torch.Generator().manual_seed(seed), None)
        dtype = pipe.transformer.dtype
        return Sample(prompt, seed, cond.to(dtype), uncond.to(dtype), latents)

    def _call(self, sample_index: int, prefix: str, branch: str, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (sample_index, prefix, branch)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        sample = self.samples[sample_index]
        embeds = sample.cond if branch == "cond" else sample.uncond
        with torch.no_grad():
            out = self.pipe.transformer(hidden_states=latents.to(self.pipe.transformer.dtype), timestep=t.expand(latents.shape[0]),
                                        encoder_hidden_states=embeds, return_dict=False)[0]
        self.calls_run += 1
        self._cache[key] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def weight(self, i: int, pair: list[int]) -> float:
        """mixcache's extrapolation weight at step ``i`` from computed steps ``pair = [i1, i2]``."""
        if len(pair) < 2:
            return 0.0
        i1, i2 = pair
        u1, u2, u = self.timesteps[i1], self.timesteps[i2], self.timesteps[i]
        return (u - u2) / (u2 - u1) / (1.0 + self.damping * max(i - i2 - 1, 0))

    def run_sample(self, sample: Sample | int, schedule: str, skip_mode: str = "full", half_mode: str = "extrapolated") -> torch.Tensor:
        index = sample if isinstance(sample, int) else None
        s = self.samples[index] if index is not None else sample
        if len(schedule) != self.steps or schedule[0] != "F":
            raise ValueError(f"a schedule has {self.steps} letters and starts with F: {schedule!r}")
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.steps, device="cpu")
        scheduler.set_begin_index(0)
        latents = s.latents.clone()
        full: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # last two full steps: (i, c, u)
        fresh_c: list[tuple[int, torch.Tensor]] = []  # last two fresh cond outputs
        g = self.guidance
        for i, t in enumerate(scheduler.timesteps):
            letter = schedule[i]
            key = index if index is not None else -1
            if letter == "F":
                c = self._call(key, schedule[: i + 1], "cond", latents, t) if index is not None else self._eager(s, "cond", latents, t)
                u = self._call(key, schedule[: i + 1], "uncond", latents, t) if index is not None else self._eager(s, "uncond", latents, t)
                full = [*full, (i, c, u)][-2:]
                fresh_c = [*fresh_c, (i, c)][-2:]
            elif letter == "H":
                c = self._call(key, schedule[: i + 1], "cond", latents, t)
                d_hat = self._extrapolate([(j, cj - uj) for j, cj, uj in full], i, plain=half_mode == "stale")
                u = c - d_hat
                fresh_c = [*fresh_c, (i, c)][-2:]
            elif letter == "S":
                if skip_mode == "full":
                    c, u = self.skipped(full, i)
                else:
                    c = self._extrapolate(fresh_c, i)
                    u = c - self._extrapolate([(j, cj - uj) for j, cj, uj in full], i)
            else:
                raise ValueError(f"unknown schedule letter {letter!r}")
            noise_pred = u + g * (c - u)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents.clamp(-1.0, 1.0)

    def _eager(self, s: Sample, branch: str, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embeds = s.cond if branch == "cond" else s.uncond
        with torch.no_grad():
            return self.pipe.transformer(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                                         encoder_hidden_states=embeds, return_dict=False)[0]

    def skipped(self, full: list[tuple[int, torch.Tensor, torch.Tensor]], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A skipped step's ``(c, u)``: each branch extrapolated from the last two full steps
        ``(i, c, u)`` (mixcache's rule, no chained approximation)."""
        return self._extrapolate([(j, cj) for j, cj, _ in full], i), self._extrapolate([(j, uj) for j, _, uj in full], i)

    def _extrapolate(self, history: list[tuple[int, torch.Tensor]], i: int, plain: bool = False) -> torch.Tensor:
        (i2, v2) = history[-1]
        w = 0.0 if plain else self.weight(i, [j for j, _ in history])
        if w == 0.0 or len(history) < 2:
            return v2
        v1 = history[0][1]
        return v2 + w * (v2 - v1)

    def score(self, schedule: str, skip_mode: str = "full", half_mode: str = "extrapolated") -> tuple[float, list[float]]:
        """Mean PSNR (dB) over the samples against the uncached videos, and the per-sample list."""
        per = [psnr(self.run_sample(k, schedule, skip_mode, half_mode), s.reference) for k, s in enumerate(self.samples)]
        return sum(per) / len(per), per

    def pipeline_check(self) -> float:
        """Largest |simulator - pipe(...)| over the samples, uncached (the simulator's check)."""
        worst = 0.0
        for s in self.samples:
            with torch.no_grad():
                ref = self.pipe(prompt=s.prompt, generator=torch.Generator().manual_seed(s.seed), **self.kwargs).frames
            ours = self.run_sample(s, "F" * self.steps)
            worst = max(worst, float((ref - ours).abs().max()))
        return worst


def cost(schedule: str) -> int:
    """Cost in half-steps (F = 2, H = 1, S = 0)."""
    return 2 * schedule.count("F") + schedule.count("H")


def make(steps: int, fulls: Any, halves: Any = ()) -> str:
    letters = ["S"] * steps
    for p in halves:
        letters[p] = "H"
    for p in fulls:
        letters[p] = "F"
    return "".join(letters)
