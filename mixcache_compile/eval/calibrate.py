"""Sensitivity calibration for ``mixcache``: ``I(g)`` for g in (step, cfg, block).

``I(g)`` answers: if the tensor granularity ``g`` reuses is off by a relative L1 error ``e``
at one step, by how much (relative L1) does the final output move, per unit of ``e``? Then
``D(g) * I(g)`` predicts the damage of reusing ``g`` when its tensor changes by ``D(g)``. It is
measured with plain PyTorch hooks on the unmodified model (no caching runtime involved):

  1. run the generation once per seed (the baseline ``y``);
  2. for each ``g`` and each perturbation point ``p`` (a fraction of the steps), run it again
     with the tensor ``g`` reuses perturbed at step ``round(p * (T - 1))``:
       step  -> the transformer output of every branch at that step,
       cfg   -> the CFG difference ``u - c`` (the uncond output moves, cond is kept),
       block -> the hidden-stream residual of blocks [Fn, N - Bn) (block N-Bn-1's output);
  3. ``I(g) = mean over points and seeds of rel_l1(y_g, y) / e``.

Two perturbations (``mode``):
  ``"gaussian"`` (METHODS.md's description, the default): add Gaussian noise with mean |value|
      ``noise`` times the tensor's (``std = noise * mean|x| * sqrt(pi/2)``), ``e = noise``;
  ``"reuse"``: substitute the previous step's value of that tensor -- exactly the error a
      reuse makes -- and take ``e`` = its measured rel-L1 against the true value.
On the shipped tiny model the two disagree sharply about the CFG difference (Gaussian: 8x
smaller; likely because later steps wash out white noise but not the smooth error of a stale
difference); ``mixcache``'s shipped defaults come from ``"reuse"`` (see mixcache.py).

The result (``{"sensitivities": {...}, "raw": {...}, ...}``) is saved as a small JSON that
``MixCacheConfig(calibration=path)`` reads. Branches are told apart by the pipeline's
``cache_context`` names ("cond", "uncond", "cond_uncond" = batch-concatenated, uncond half
first as diffusers pipelines concatenate), else by call order within a step (cond first);
steps by the timestep input.

The file format (``save`` / ``load``) belongs to the policy and lives in
``policies/calibration.py``; this module is the measuring tool. ``main(argv)`` is the
command-line entry (``mixcache calibrate``): by default it calibrates
the shipped tiny text-to-video model, in ``"reuse"`` mode (the recommended one, above).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..branches import BATCHED_CONTEXT_NAMES
from ..cli_helpers import ModelSpecError, load_model_spec, write_or_print
from ..model_parts import find_blocks, first_output, replace_first_output
from ..policies.calibration import FORMAT_VERSION, GRANULARITIES, MODES, save
from ..progress import add_quiet_flag, set_quiet
from ..runtime.context import CallContext, StepTracker


class _BranchSteps:
    """Step index and branch of each transformer call, by the runtime's own ``StepTracker``
    (steps from timestep changes, branches from ``cache_context`` names, else call order,
    cond first), so calibration and the runtime agree on where a call is; like the runtime, it
    reads a branch seen twice at one timestep as a new generation (a pipeline making three
    denoiser calls per step is outside both). ``name``: the ``cache_context`` name open now
    (set by the Perturber)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._steps = StepTracker("separate", ("cond", "uncond"))
        self._calls = 0

    def on_call(self, kwargs: dict[str, Any]) -> tuple[int, str]:
        t = kwargs.get("timestep")
        self._calls += 1
        value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (float(t) if t is not None else None)
        if value is None:  # no timestep to read: every call is a step of its own
            value = -float(self._calls)
        batched = True if self.name in BATCHED_CONTEXT_NAMES else None
        position = self._steps.resolve(CallContext(name=self.name, batched=batched), value)
        return position.step, position.branch


def _noise_like(x: torch.Tensor, scale_of: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise whose mean |value| is ``rel * mean|scale_of|``."""
    std = rel * scale_of.abs().mean() * math.sqrt(math.pi / 2)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32, device="cpu").to(device=x.device, dtype=x.dtype)
    return noise * std


class Perturber:
    """Installs the hooks for one perturbed run: granularity ``g`` at step ``at``.

    ``mode="gaussian"`` adds noise of relative size ``rel`` (``errors`` records ``rel``);
    ``mode="reuse"`` substitutes the previous step's value, the error reuse really makes
    (``errors`` records its rel-L1 against the true value). ``granularity=None`` only counts
    the steps.
    """

    def __init__(self, model: torch.nn.Module, granularity: str | None, at: int, rel: float, seed: int, Fn: int, Bn: int,  # noqa: N803
                 mode: str = "gaussian") -> None:
        self.model, self.g, self.at, self.rel, self.mode = model, granularity, at, rel, mode
        self.gen = torch.Generator().manual_seed(seed + 7919 * at)
        self.blocks = find_blocks(model)
        stop = len(self.blocks) - Bn
        if granularity == "block" and not 1 <= Fn < stop:
            raise ValueError(f"Fn={Fn}, Bn={Bn} leave no block range in a {len(self.blocks)}-block model")
        self.first, self.last = Fn, stop - 1
        self.tracker = _BranchSteps()
        self.position: tuple[int, str] = (-1, "cond")
        self.cond_out: torch.Tensor | None = None
        self.range_in: torch.Tensor | None = None
        self.previous: dict[tuple[str, str], torch.Tensor] = {}  # (what, branch) -> last step's value
        self.errors: list[float] = []
        self.steps_seen = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True),
        ]
        if self.g == "block":
            handles.append(self.blocks[self.first].register_forward_pre_hook(self._block_in, with_kwargs=True))
            handles.append(self.blocks[self.last].register_forward_hook(self._block_out, with_kwargs=True))
        original = getattr(self.model, "cache_context", None)
        own = self.model.__dict__.get("cache_context")  # an instance-level wrapper to restore
        if original is not None:
            self.model.cache_context = self._wrap_context(original)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if original is not None:
                if own is not None:
                    self.model.cache_context = own  # type: ignore[method-assign]
                else:
                    del self.model.cache_context

    def _wrap_context(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @contextlib.contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            self.tracker.name = name
            try:
                with original(name, **kwargs):
                    yield
            finally:
                self.tracker.name = None

        return cache_context

    def _perturb(self, what: str, branch: str, value: torch.Tensor, scale_of: torch.Tensor) -> torch.Tensor | None:
        """The perturbed ``value`` at the perturbation step, else None (and remember the true one)."""
        key = (what, branch)
        previous = self.previous.get(key)
        self.previous[key] = value.detach().clone()
        if self.position[0] != self.at or self.g != what:
            return None
        if self.mode == "gaussian":
            self.errors.append(self.rel)
            return value + _noise_like(value, scale_of, self.rel, self.gen)
        if previous is None or previous.shape != value.shape:
            return None
        self.errors.append(_rel_l1(previous, value))
        return previous

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.position = self.tracker.on_call(kwargs)
        self.steps_seen = self.position[0] + 1

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        branch = self.position[1]
        y = first_output(out)
        new = self._perturb("step", branch, y, y)
        current = y if new is None else new
        if branch == "cond":
            self.cond_out = current.detach()
        elif branch == "uncond" and self.cond_out is not None:
            delta = self._perturb("cfg", "uncond", current - self.cond_out, current - self.cond_out)
            new = new if delta is None else self.cond_out + delta
        elif branch == "batch":  # diffusers' batch order: uncond half first
            u, c = current.chunk(2, dim=0)
            delta = self._perturb("cfg", "batch", u - c, u - c)
            new = new if delta is None else torch.cat([c + delta, c], dim=0)
        return None if new is None else replace_first_output(out, new)

    def _block_in(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.range_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _block_out(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if self.range_in is None:
            return None
        h = first_output(out)
        new = self._perturb("block", self.position[1], h - self.range_in, h - self.range_in)
        return None if new is None else replace_first_output(out, self.range_in + new)


# ---- the calibration run ---------------------------------------------------------------------------
def _pipeline_runner(pipe: Any, call_kwargs: Mapping[str, Any]) -> Callable[[int], torch.Tensor]:
    def run(seed: int) -> torch.Tensor:
        out = pipe(**{"output_type": "latent", **call_kwargs}, generator=torch.Generator().manual_seed(seed))
        for attr in ("frames", "images", "sample"):
            if hasattr(out, attr):
                return getattr(out, attr)
        return out[0]

    return run


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean() / (b.float().abs().mean() + 1e-12))


@torch.no_grad()
def calibrate(
    model_or_pipe: Any,
    call_kwargs: Mapping[str, Any] | None = None,
    *,
    run: Callable[[int], torch.Tensor] | None = None,
    noise: float = 0.1,
    at: Sequence[float] = (0.3, 0.5, 0.7),
    seeds: Sequence[int] = (0,),
    Fn: int = 1,  # noqa: N803
    Bn: int = 1,  # noqa: N803
    granularities: Sequence[str] = GRANULARITIES,
    mode: str = "gaussian",
) -> dict[str, Any]:
    """Measure ``I(g)`` (see the module docstring).

    ``model_or_pipe``: a diffusers pipeline (its ``transformer`` is hooked; it is called with
    ``call_kwargs`` plus a seeded ``generator``) or a transformer with ``run(seed) -> final
    tensor`` running one whole generation through it. ``mode``: "gaussian" or "reuse" (see
    the module docstring). Returns ``{"sensitivities": I normalised to max 1, "raw": I,
    "mode", "noise", "at", "seeds", "num_steps", "Fn", "Bn", "format"}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(noise, (int, float)) and noise > 0):
        raise ValueError(f"noise must be a positive number, got {noise!r}")
    if not at or not all(0.0 <= p <= 1.0 for p in at):
        raise ValueError(f"at must be fractions in [0, 1], got {at!r}")
    bad = set(granularities) - set(GRANULARITIES)
    if bad:
        raise ValueError(f"unknown granularities {sorted(bad)}; valid: {GRANULARITIES}")
    model = getattr(model_or_pipe, "transformer", model_or_pipe)
    if not isinstance(model, torch.nn.Module):
        raise TypeError("calibrate needs a diffusers pipeline (with .transformer) or a torch.nn.Module")
    if run is None:
        if model is model_or_pipe:
            raise TypeError("a bare model needs run=callable(seed) that runs one generation through it")
        run = _pipeline_runner(model_or_pipe, call_kwargs or {})
    from ..progress import progress

    raw: dict[str, list[float]] = {g: [] for g in granularities}
    num_steps = 0
    bar = progress(desc=f"calibrate ({mode})", total=len(seeds) * (1 + len(granularities) * len(at)), unit="generation")
    for seed in seeds:
        counter = Perturber(model, None, -1, noise, seed, Fn, Bn)
        with counter.installed():
            baseline = run(seed)
        bar.update()
        num_steps = counter.steps_seen
        for g in granularities:
            for p in at:
                step = min(num_steps - 1, round(p * (num_steps - 1)))
                step = max(step, 1) if mode == "reuse" else step  # reuse needs a previous step
                perturber = Perturber(model, g, step, noise, seed, Fn, Bn, mode)
                with perturber.installed():
                    moved = run(seed)
                bar.update()
                bar.set_postfix_str(f"seed {seed}, {g} at {p:g}")
                if perturber.errors:
                    error = sum(perturber.errors) / len(perturber.errors)
                    raw[g].append(_rel_l1(moved, baseline) / max(error, 1e-12))
    bar.close()
    missing = [g for g, v in raw.items() if not v]
    if missing:
        raise ValueError(f"granularities {missing} were never perturbed (no CFG branch / no previous step?)")
    mean = {g: sum(v) / len(v) for g, v in raw.items()}
    top = max(mean.values()) or 1.0
    return {
        "format": FORMAT_VERSION,
        "sensitivities": {g: v / top for g, v in mean.items()},
        "raw": mean,
        "mode": mode,
        "noise": noise,
        "at": list(at),
        "seeds": list(seeds),
        "num_steps": num_steps,
        "Fn": Fn,
        "Bn": Bn,
    }


# ---- command line ----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixcache calibrate", description="Measure MixCache sensitivities I(g) and save them as JSON.")
    p.add_argument("--out", "-o", help="where to write the JSON (default: print it)")
    p.add_argument("--model", default="zoo", help="'zoo' (the shipped tiny T2V model) or 'module:factory' returning (pipe, call_kwargs)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the calibration run (default 30; 50 with --target-psnr)")
    p.add_argument("--noise", type=float, default=0.1, help="relative size of the injected noise")
    p.add_argument("--at", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="perturbation points (fractions of the steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--prompt", default="red circle moving left", help="prompt for the zoo model")
    p.add_argument("--Fn", type=int, default=1)
    p.add_argument("--Bn", type=int, default=1)
    p.add_argument("--target-psnr", type=float, default=None,
                   help="fit mixcache's error-budget coefficients and the threshold reaching this mean PSNR on the "
                        "calibration prompts/seeds (eval/budget_fit.py; --steps defaults to 50 then)")
    p.add_argument("--samples", type=int, default=2, help="--target-psnr: calibration prompt/seed pairs used (budget_fit.py)")
    p.add_argument("--damping", type=float, default=None,
                   help="--target-psnr: the step extrapolation's damping, written into the file and used by the threshold search")
    p.add_argument("--search-steps", type=int, default=3, help="--target-psnr: bisection steps of the threshold search")
    # Default "reuse": the shipped sensitivities were made with it, and Gaussian noise ranks
    # reusing the CFG difference about 8x less harmful than the stale difference really is.
    p.add_argument("--mode", choices=MODES, default="reuse",
                   help="perturbation: 'reuse' (default; substitutes the previous step's value, the error a reuse "
                        "really makes; the shipped sensitivities were made with it) or 'gaussian' (noise of size "
                        "--noise; ranks CFG reuse ~8x less harmful than it is on the shipped model)")
    add_quiet_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_quiet(args.quiet)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    steps = args.steps if args.steps is not None else (50 if args.target_psnr is not None else 30)
    try:
        pipe, kwargs = load_model_spec(args.model, steps, prompt=args.prompt)
    except ModelSpecError as err:
        raise SystemExit(f"mixcache calibrate: --model: {err}") from None
    if args.model != "zoo":
        kwargs = {**kwargs, "num_inference_steps": steps}
    if args.target_psnr is not None:
        from .budget_fit import CALIBRATION_PROMPTS, CALIBRATION_SEEDS, fit

        kwargs.pop("prompt", None)
        samples = [(p, s) for p in CALIBRATION_PROMPTS for s in CALIBRATION_SEEDS][:args.samples]
        result = fit(pipe, kwargs, args.target_psnr, samples=samples, fn=args.Fn, bn=args.Bn, search_steps=args.search_steps,
                     damping=args.damping, log=lambda s: print(s, file=sys.stderr, flush=True))
        write_or_print(result, args.out, lambda r: f"threshold {r['threshold']:.4g}, k {json.dumps(r['k'])}", save)
        return 0
    result = calibrate(pipe, kwargs, noise=args.noise, at=args.at, seeds=args.seeds, Fn=args.Fn, Bn=args.Bn, mode=args.mode)
    write_or_print(result, args.out, lambda r: json.dumps(r["sensitivities"]), save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
