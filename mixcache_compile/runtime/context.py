"""Where the denoising loop is: step index, branch, generation.

Sources, strongest first:
  1. a context set around the call: diffusers' ``cache_context(name, step_index=,
     num_inference_steps=, sigma=)`` (wired by ``enable``) or the session's explicit API;
  2. the timestep input: a new value is a new step, a value higher than the last one (more
     noise) starts a new generation, and within one step the calls follow ``branch_order``;
  3. batch-concatenated CFG (``cfg="batched"``): one call carries both branches ("batch").
Note [new generation]: a step index lower than the last one, or a branch computed twice at
the same step, means a new generation began; the session then drops every cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CallContext:
    """What the caller told us about the next call(s)."""

    name: str | None = None
    step_index: int | None = None
    num_steps: int | None = None
    batched: bool | None = None  # True: this call carries both CFG branches


@dataclass(frozen=True)
class CallPosition:
    step: int | None  # None: unknown (no context, no timestep) -> the runtime computes in full
    branch: str
    num_steps: int | None
    new_generation: bool


from ..branches import SEPARATE_CONTEXT_BRANCHES as _BRANCH_NAMES  # the one branch-name table


class StepTracker:
    def __init__(self, cfg: str, branch_order: tuple[str, str]) -> None:
        self.cfg = cfg
        self.branch_order = branch_order
        self.reset()

    def reset(self) -> None:
        self.step: int | None = None
        self.last_timestep: float | None = None
        self.seen_at_step: list[str] = []

    def resolve(self, ctx: CallContext | None, timestep: float | None) -> CallPosition:
        batched = self._is_batched(ctx)
        num_steps = ctx.num_steps if ctx else None
        if ctx is not None and ctx.step_index is not None:
            branch = "batch" if batched else self._named_branch(ctx)
            return self._advance_to(ctx.step_index, branch, num_steps)
        if timestep is None:
            return CallPosition(None, "batch" if batched else "cond", num_steps, False)
        return self._from_timestep(timestep, ctx, batched, num_steps)

    def _is_batched(self, ctx: CallContext | None) -> bool:
        if ctx is not None and ctx.batched is not None:
            return ctx.batched
        return self.cfg == "batched"

    def _named_branch(self, ctx: CallContext) -> str:
        if ctx.name in _BRANCH_NAMES:
            return _BRANCH_NAMES[ctx.name]
        # An unnamed call in a separate-CFG loop: the n-th call of the step is branch_order[n].
        n = len(self.seen_at_step)
        return self.branch_order[n] if n < len(self.branch_order) and self.cfg != "none" else "cond"

    def _advance_to(self, step: int, branch: str, num_steps: int | None) -> CallPosition:
        new_gen = False
        if self.step is None or step > self.step:
            self.seen_at_step = []
        elif step < self.step or branch in self.seen_at_step:
            new_gen = True
            self.seen_at_step = []
        self.step = step
        self.seen_at_step.append(branch)
        return CallPosition(step, branch, num_steps, new_gen)

    def _from_timestep(self, t: float, ctx: CallContext | None, batched: bool, num_steps: int | None) -> CallPosition:
        if self.last_timestep is None or self.step is None:
            step, new_gen = 0, self.last_timestep is not None
        elif t > self.last_timestep:
            step, new_gen = 0, True
        elif t < self.last_timestep:
            step, new_gen = self.step + 1, False
        else:
            step, new_gen = self.step, False
        self.last_timestep = t
        if new_gen or self.step is None or step != self.step:
            self.seen_at_step = []
        if batched:
            branch = "batch"
        elif ctx is not None and ctx.name in _BRANCH_NAMES:
            branch = _BRANCH_NAMES[ctx.name]
        else:
            n = len(self.seen_at_step)
            branch = self.branch_order[n] if n < len(self.branch_order) and self.cfg != "none" else "cond"
        if branch in self.seen_at_step:  # Note [new generation]: same timestep again
            new_gen, step, self.seen_at_step = True, 0, []
        self.step = step
        self.seen_at_step.append(branch)
        return CallPosition(step, branch, num_steps, new_gen)
