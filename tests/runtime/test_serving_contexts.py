"""The contexts a server meets, on the shipped pipeline (issue #16's matrix).

One enabled pipeline per policy goes through every context in turn (so mode, dtype, batch
and shape switches happen between generations of one session, as on a server):
  * policy ``none``: each output equals the uncached pipeline's under the same context;
  * a static schedule: each generation takes exactly the scheduled decisions, with no
    fallback, and runs half the FLOPs of a full generation.
Each context is a Dynamo recompile of the shipped model (~10-40 s each on the shared
2-core machine), hence ``slow``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import mixcache_compile
from mixcache_compile.zoo import default_call_kwargs, load_pipeline

STEPS = 6
PROMPTS = ("red circle moving left", "blue square moving right")
# 12 calls per generation: 4 STEP (steps 2 and 4), 2 CFG (uncond of steps 3 and 5), 6 FULL.
SCHEDULE = {2: "step", 4: "step", (3, "uncond"): "cfg", (5, "uncond"): "cfg"}
EXPECTED_ACTIONS = {"FULL": 6, "STEP": 4, "CFG": 2}


class Interrupt(Exception):
    """Raised from a step callback: a request cancelled mid-generation."""


def _interrupt_at_step_2(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
    if step == 2:
        raise Interrupt
    return callback_kwargs


@contextlib.contextmanager
def _bf16_autocast() -> Iterator[None]:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


# name -> (autograd/autocast context, pipeline call overrides, tolerance against uncached)
CONTEXTS: dict[str, tuple[Callable[[], Any], dict[str, Any], float]] = {
    "inference_mode": (torch.inference_mode, {}, 1e-5),
    "no_grad": (torch.no_grad, {}, 1e-5),
    "bf16_autocast": (_bf16_autocast, {}, 2e-2),
    "prompt_batch": (torch.inference_mode, {"prompt": list(PROMPTS)}, 1e-5),
    "videos_per_prompt": (torch.inference_mode, {"num_videos_per_prompt": 2}, 1e-5),
    "frame_count_change": (torch.inference_mode, {"num_frames": 4}, 1e-5),
}


def _pipe() -> Any:
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Any, context: Callable[[], Any] = torch.inference_mode, prompt: Any = PROMPTS[0], **overrides: Any) -> torch.Tensor:
    kwargs = {**default_call_kwargs(), "num_inference_steps": STEPS, "prompt": prompt, **overrides}
    with context():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames


class _Delta:
    """What a session did between two snapshots of its stats."""

    def __init__(self, session: mixcache_compile.CacheSession) -> None:
        self.session, self.before = session, session.stats()

    def actions(self) -> dict[str, int]:
        after = self.session.stats()["actions"]
        return {k: v for k, v in (Counter(after) - Counter(self.before["actions"])).items() if v}

    def fallbacks(self) -> dict[str, int]:
        return dict(Counter(self.session.stats()["fallbacks"]) - Counter(self.before["fallbacks"]))

    def computed_fraction(self) -> float:
        after = self.session.stats()
        return (after["flops_run"] - self.before["flops_run"]) / (after["flops_full"] - self.before["flops_full"])


def _check(policy: str, session: Any, delta: _Delta, got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    assert got.shape == want.shape, what
    if policy == "none":
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")
        assert delta.actions() == {"FULL": 2 * STEPS}, what
        assert delta.computed_fraction() == 1.0, what
    else:
        assert delta.actions() == EXPECTED_ACTIONS, f"{what}: {delta.actions()}"
        assert delta.computed_fraction() == pytest.approx(0.5), what
    assert not delta.fallbacks(), f"{what}: {delta.fallbacks()}"
    assert not session.stats()["flops_unknown"], what


class _SerialisedCalls:
    """Dynamo is not safe when two threads enter compiled frames at the same moment (see
    README, Reliability), so each transformer call holds a process-wide lock; the two
    requests still interleave call by call, each through its own session."""

    lock = threading.Lock()

    @classmethod
    def _acquire(cls, *_: Any) -> None:  # a pre-hook that returned a value would replace the call's args
        cls.lock.acquire()

    @classmethod
    def install(cls, pipe: Any) -> None:
        pipe.transformer.register_forward_pre_hook(cls._acquire)
        # always_call: released even when the call raises, so the other request cannot hang.
        pipe.transformer.register_forward_hook(lambda *_: cls.lock.release(), always_call=True)


def _in_threads(jobs: list[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
    """Run each job on its own thread; re-raise the first exception a job raised."""
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as err:  # noqa: BLE001 - handed back to the test thread
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    for i in range(len(jobs)):
        if isinstance(results.get(i), BaseException):
            raise results[i]
    assert len(results) == len(jobs), "a request thread did not finish"
    return [results[i] for i in range(len(jobs))]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "static"])
def test_serving_contexts_on_the_shipped_pipeline(policy: str):
    options = {"schedule": SCHEDULE} if policy == "static" else {}
    reference = _pipe()
    pipe = _pipe()
    session = mixcache_compile.enable(pipe, policy=policy, engine="eager", **options)
    outputs: dict[str, torch.Tensor] = {}
    for name, (context, overrides, atol) in CONTEXTS.items():
        delta = _Delta(session)
        outputs[name] = _generate(pipe, context, **overrides)
        want = _generate(reference, context, **overrides)
        _check(policy, session, delta, outputs[name], want, atol, name)
    # The decisions do not depend on the autograd mode: same output either way.
    torch.testing.assert_close(outputs["no_grad"], outputs["inference_mode"], rtol=0, atol=1e-6)

    # A generation interrupted by an exception, then a clean one.
    with pytest.raises(Interrupt):
        _generate(pipe, callback_on_step_end=_interrupt_at_step_2)
    delta = _Delta(session)
    clean = _generate(pipe)
    _check(policy, session, delta, clean, _generate(reference), 1e-5, "after an interrupted generation")
    torch.testing.assert_close(clean, outputs["inference_mode"], rtol=0, atol=0)

    # Two requests on two threads, each through its own pipeline and session.
    other = _pipe()
    other_session = mixcache_compile.enable(other, policy=policy, engine="eager", **options)
    alone = _generate(other, prompt=PROMPTS[1])  # traced here; the threads only run compiled code
    for p in (pipe, other):
        _SerialisedCalls.install(p)
    deltas = [_Delta(session), _Delta(other_session)]
    results = _in_threads([lambda: _generate(pipe, prompt=PROMPTS[0]), lambda: _generate(other, prompt=PROMPTS[1])])
    for i, (s, want) in enumerate(((session, outputs["inference_mode"]), (other_session, alone))):
        _check(policy, s, deltas[i], results[i], want, 0.0, f"thread {i}")
        torch.testing.assert_close(results[i], want, rtol=0, atol=0)  # as when it ran alone


def test_a_new_shape_in_a_new_generation_is_not_a_mid_generation_change():
    """A server's next request may have other sizes: no warning, no fallback, caching engaged."""
    from mixcache_compile import CacheSession
    from tests.tiny_models import wan

    model, make = wan()
    session = CacheSession("static", schedule={1: "step"})
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        for frames in (2, 4):  # two generations, the second with more frames
            for step in range(2):
                kwargs = {**make(1, seed=step, t=900.0 - 100 * step)}
                kwargs["hidden_states"] = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(step))
                with session.context("cond", step_index=step):
                    compiled(**kwargs)
    assert not [w for w in caught if "mid-generation" in str(w.message)]
    assert [e.action for e in session.trace] == ["FULL", "STEP", "FULL", "STEP"]
    assert not session.stats()["fallbacks"]
