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

``main(argv)`` is the command-line entry (``mixcache calibrate``): by default it calibrates
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
from pathlib import Path
from typing import Any

import torch

from ..progress import add_quiet_flag, set_quiet

GRANULARITIES = ("step", "cfg", "block")
MODES = ("gaussian", "reuse")
FORMAT_VERSION = 1
_BLOCK_LISTS = ("transformer_blocks", "blocks", "double_blocks", "joint_blocks", "layers")


# ---- files ------------------------------------------------------------------------------------
def save(result: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def load(path: str | os.PathLike[str]) -> dict[str, float]:
    """The sensitivities of a calibration file (a full result, or a plain {g: value} map)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {os.fspath(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {os.fspath(path)!r} is not JSON: {err}") from None
    values = data.get("sensitivities", data) if isinstance(data, dict) else None
    if not isinstance(values, dict) or not values or not all(isinstance(v, (int, float)) for v in values.values()):
        raise ValueError(f"calibration file {os.fspath(path)!r} has no 'sensitivities' mapping of numbers")
    return {str(k): float(v) for k, v in values.items()}


BUDGET_FORMAT = 2


def load_budget(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The error-budget calibration of ``mixcache`` (``budget_fit.py`` writes it): ``k``
    (coefficient per ``budget.COEFFICIENTS``), ``savings`` (``block``, ``attn`` in [0, 1]),
    ``rescale`` (indicator polynomial, highest degree first) and ``threshold``."""
    from .budget import COEFFICIENTS

    name = os.fspath(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {name!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {name!r} is not JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != BUDGET_FORMAT:
        raise ValueError(f"calibration file {name!r} is not a mixcache budget calibration (format {BUDGET_FORMAT}); "
                         "write one with `mixcache calibrate --target-psnr X --out FILE`")

    def number(value: Any, what: str, low: float = 0.0, high: float = math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"calibration file {name!r}: {what} must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    k, savings, rescale = data.get("k"), data.get("savings"), data.get("rescale")
    if not isinstance(k, dict) or set(k) != set(COEFFICIENTS):
        raise ValueError(f"calibration file {name!r}: 'k' must map exactly {COEFFICIENTS} to numbers, got {k!r}")
    if not isinstance(savings, dict) or set(savings) != {"block", "attn"}:
        raise ValueError(f"calibration file {name!r}: 'savings' must map 'block' and 'attn' to fractions, got {savings!r}")
    if not isinstance(rescale, list) or not rescale:
        raise ValueError(f"calibration file {name!r}: 'rescale' must be a non-empty list of numbers, got {rescale!r}")
    return {
        **data,
        "k": {q: number(v, f"k[{q!r}]") for q, v in k.items()},
        "savings": {q: number(v, f"savings[{q!r}]", 0.0, 1.0) for q, v in savings.items()},
        "rescale": [number(c, "rescale[]", -math.inf) for c in rescale],
        "threshold": number(data.get("threshold"), "threshold"),
    }


# ---- the perturbation hooks --------------------------------------------------------------------
def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's main list of transformer blocks (the first chain)."""
    for name in _BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks
    lists = [m for m in model.children() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks to calibrate")
    return max(lists, key=len)


def _noise_like(x: torch.Tensor, scale_of: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise whose mean |value| is ``rel * mean|scale_of|``."""
    std = rel * scale_of.abs().mean() * math.sqrt(math.pi / 2)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32, device="cpu").to(device=x.device, dtype=x.dtype)
    return noise * std


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def _replace_first(out: Any, value: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return value
    if isinstance(out, tuple):
        return (value, *out[1:])
    if isinstance(out, list):
        return [value, *out[1:]]
    out.sample = value
    return out


class _Tracker:
    """Step index (from timestep changes) and branch (from cache_context names / call order)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.step = -1
        self.last_t: float | None = None
        self.calls_in_step = 0

    def on_call(self, kwargs: dict[str, Any]) -> tuple[int, str]:
        t = kwargs.get("timestep")
        value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (float(t) if t is not None else None)
        if value is None or value != self.last_t:
            self.step, self.calls_in_step, self.last_t = self.step + 1, 0, value
        self.calls_in_step += 1
        names = {"cond": "cond", "uncond": "uncond", "cond_uncond": "batch", "negative": "uncond", "positive": "cond"}
        if self.name in names:
            return self.step, names[self.name]
        return self.step, ("cond" if self.calls_in_step == 1 else "uncond")


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
        self.tracker = _Tracker()
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
        y = _first(out)
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
        return None if new is None else _replace_first(out, new)

    def _block_in(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.range_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def _block_out(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if self.range_in is None:
            return None
        h = _first(out)
        new = self._perturb("block", self.position[1], h - self.range_in, h - self.range_in)
        return None if new is None else _replace_first(out, self.range_in + new)


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
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixcache calibrate", description="Measure MixCache sensitivities I(g) and save them as JSON.")
    p.add_argument("--out", "-o", help="where to write the JSON (default: print it)")
    p.add_argument("--model", default="zoo", help="'zoo' (the shipped tiny T2V model), a shipped model's name (zoo.MODELS: tiny, deep) or "
                        "'module:factory' returning (pipe, call_kwargs)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the calibration run (default 30; 50 with --target-psnr)")
    p.add_argument("--noise", type=float, default=0.1, help="relative size of the injected noise")
    p.add_argument("--at", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="perturbation points (fractions of the steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--prompt", default="red circle moving left", help="prompt for the zoo model")
    p.add_argument("--Fn", type=int, default=1)
    p.add_argument("--Bn", type=int, default=1)
    p.add_argument("--target-psnr", type=float, default=None,
                   help="fit mixcache's error-budget coefficients and the threshold reaching this mean PSNR on the "
                        "calibration prompts/seeds (policies/budget_fit.py; --steps defaults to 50 then)")
    p.add_argument("--samples", type=int, default=2, help="--target-psnr: calibration prompt/seed pairs used (budget_fit.py)")
    p.add_argument("--search-steps", type=int, default=3, help="--target-psnr: bisection steps of the threshold search")
    # Default "reuse": the shipped sensitivities were made with it, and Gaussian noise ranks
    # reusing the CFG difference about 8x less harmful than the stale difference really is.
    p.add_argument("--mode", choices=MODES, default="reuse",
                   help="perturbation: 'reuse' (default; substitutes the previous step's value, the error a reuse "
                        "really makes; the shipped sensitivities were made with it) or 'gaussian' (noise of size "
                        "--noise; ranks CFG reuse ~8x less harmful than it is on the shipped model)")
    add_quiet_flag(p)
    return p


def _load_target(spec: str, steps: int, prompt: str) -> tuple[Any, dict[str, Any]]:
    from ..zoo import MODELS

    if spec == "zoo" or spec in MODELS:
        from ..zoo import default_call_kwargs, load_pipeline

        pipe = load_pipeline() if spec == "zoo" else load_pipeline(name=spec)
        pipe.set_progress_bar_config(disable=True)
        return pipe, {"prompt": prompt, **default_call_kwargs(num_inference_steps=steps)}
    module, _, factory = spec.partition(":")
    if not factory:
        raise SystemExit(f"--model must be 'zoo' or 'module:factory', got {spec!r}")
    import importlib

    pipe, kwargs = getattr(importlib.import_module(module), factory)()
    return pipe, {**kwargs, "num_inference_steps": steps}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    set_quiet(args.quiet)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    steps = args.steps if args.steps is not None else (50 if args.target_psnr is not None else 30)
    pipe, kwargs = _load_target(args.model, steps, args.prompt)
    if args.target_psnr is not None:
        from .budget_fit import fit

        kwargs.pop("prompt", None)
        from .budget_fit import CALIBRATION_PROMPTS, CALIBRATION_SEEDS

        samples = [(p, s) for p in CALIBRATION_PROMPTS for s in CALIBRATION_SEEDS][:args.samples]
        result = fit(pipe, kwargs, args.target_psnr, samples=samples, fn=args.Fn, bn=args.Bn, search_steps=args.search_steps,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
        if args.out:
            save(result, args.out)
            print(f"wrote {args.out}: threshold {result['threshold']:.4g}, k {json.dumps(result['k'])}")
        else:
            json.dump(result, sys.stdout, indent=2, sort_keys=True)
            print()
        return 0
    result = calibrate(pipe, kwargs, noise=args.noise, at=args.at, seeds=args.seeds, Fn=args.Fn, Bn=args.Bn, mode=args.mode)
    if args.out:
        save(result, args.out)
        print(f"wrote {args.out}: {json.dumps(result['sensitivities'])}")
    else:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
