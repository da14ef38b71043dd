"""``CacheSession``: the state of one denoising run, kept outside every compiled graph.

It holds the step/branch tracker, the policy, the owned cache buffers, the decision trace and
the statistics. Python state in the callable a backend returns is not guarded by Dynamo, so
keeping it here (never on the ``nn.Module``) is what keeps the graph free of recompiles.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..policies import DEFAULT_POLICY, PolicyConfig, make_policy
from ..policies.protocol import COND_HALF, FULL, Action, ActionKind, CacheNeeds, CallReport, Observation, Policy
from .cache_store import CacheStore
from .context import CallContext, CallPosition, StepTracker
from .distributed import agree_all, reduce_mean, reduce_ratio
from .executor import ProbeRun
from .host_flags import FiniteFlag
from .trace_log import DEFAULT_TRACE_LIMIT, TraceLog
from .parts import OnDemand, part_missing, part_prefixes

log = logging.getLogger(__name__)

_CFG_MODES = ("auto", "separate", "batched", "none")


@dataclass(frozen=True)
class TraceEntry:
    """One decision: which call, what the policy asked, what ran and why if it differs."""

    generation: int
    step: int | None
    branch: str
    action: str
    requested: str
    fallback: str | None = None
    indicator: float | None = None


@dataclass
class _Call:
    """The decision state of the call in progress (a probe may change it mid-call)."""

    pos: CallPosition
    obs: Observation | None
    requested: Action = FULL
    action: Action = FULL
    reason: str | None = None
    indicator: float | None = None
    deviations: dict[str, torch.Tensor] = field(default_factory=dict)


class CacheSession:
    """State of caching across the calls of a denoising loop.

    ``policy``: a config (``FbCacheConfig(threshold=0.1)``), a name from
    ``mixcache_compile.policies.POLICIES`` with its options as keyword arguments (a shortcut
    that builds the config), or a policy object; default ``DEFAULT_POLICY``. ``cfg``: "auto" (separate branch calls, told apart by
    context names or by call order within a timestep), "separate", "batched" (one call
    carries ``batch_order`` halves), or "none". ``branch_order``: the order of the two branch
    calls of a step when no context names them (diffusers pipelines call cond first).
    ``trace_limit``: how many decisions ``trace`` keeps, oldest dropped (Note [bounded trace]).
    """

    def __init__(
        self,
        policy: str | PolicyConfig | Policy = DEFAULT_POLICY,
        *,
        cfg: str = "auto",
        branch_order: tuple[str, str] = ("cond", "uncond"),
        batch_order: tuple[str, str] = ("uncond", "cond"),
        check_finite: bool = True,
        trace_limit: int | None = DEFAULT_TRACE_LIMIT,
        **policy_options: Any,
    ) -> None:
        if cfg not in _CFG_MODES:
            raise ValueError(f"unknown cfg mode {cfg!r}; valid modes: {', '.join(_CFG_MODES)}")
        for name, order in (("branch_order", branch_order), ("batch_order", batch_order)):
            if sorted(order) != ["cond", "uncond"]:
                raise ValueError(f"{name} must be ('cond', 'uncond') in some order, got {order!r}")
        self.policy: Policy = make_policy(policy, **policy_options)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.check_finite = check_finite
        self.cfg = cfg
        self.batch_order = tuple(batch_order)
        self._tracker = StepTracker(cfg, tuple(branch_order))
        self._store = CacheStore()
        self._finite: dict[tuple, FiniteFlag] = {}  # Note [finite flags off the per-call path]
        self._local = threading.local()
        self._runner: Any = None
        self._needs: CacheNeeds | None = None
        self._warned: set[str] = set()
        # The ranks that share one sequence (Note [rank-consistent decisions]); None = world.
        # Set by mixcache_compile.parallel for models with diffusers context parallelism.
        self.process_group: Any = None
        self.trace: TraceLog[TraceEntry] = TraceLog(trace_limit)
        self.generation = 0
        self._reset_counters()

    # ---- public API --------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation: caches freed, tracker and policy reset."""
        self._store.clear()
        self._finite.clear()
        self._tracker.reset()
        self.policy.reset()
        self._signature = None
        self._computed_this_step: set[str] = set()

    def set_context(
        self,
        name: str | None = None,
        step_index: int | None = None,
        num_inference_steps: int | None = None,
        batched: bool | None = None,
        **_: Any,
    ) -> None:
        """Describe the next call(s): branch name and step index (what diffusers' ``cache_context`` carries)."""
        if step_index is not None and (not isinstance(step_index, int) or step_index < 0):
            raise ValueError(f"step_index must be a non-negative int, got {step_index!r}")
        self._local.ctx = CallContext(name, step_index, num_inference_steps, batched)

    def clear_context(self) -> None:
        self._local.ctx = None

    @contextlib.contextmanager
    def context(self, name: str | None = None, step_index: int | None = None, num_inference_steps: int | None = None, batched: bool | None = None) -> Iterator[None]:
        """For hand-written loops: ``with session.context("cond", step_index=i, num_inference_steps=n): model(...)``."""
        previous = getattr(self._local, "ctx", None)
        self.set_context(name, step_index, num_inference_steps, batched)
        try:
            yield
        finally:
            self._local.ctx = previous

    def stats(self) -> dict[str, Any]:
        run, full = self._flops_run, self._flops_full
        return {
            "calls": self._calls,
            "computed_fraction": run / full if full else 1.0,
            "flops_run": run,
            "flops_full": full,
            "actions": dict(self._actions),
            "fallbacks": dict(self._fallbacks),
            "non_finite": self._non_finite_count,
            # Calls under torch.compile that never reached this session (Note [bypass detector]).
            "bypassed_calls": self._bypassed_calls,
            "generations": self.generation + (1 if self._calls else 0),
            "cache_bytes": self._store.nbytes(),
            "cache_peak_bytes": self._store.peak_bytes,
            "cache_allocations": self._store.allocations,
            # Note [accounting never breaks a call]: stages not counted on fake tensors.
            "flops_unknown": {n: r.note for n, r in self._flop_notes.items() if r.flops is None},
            "flops_from_real_tensors": sorted(n for n, r in self._flop_notes.items() if r.flops is not None),
            "trace_dropped": self.trace.dropped,
            # stage graphs a full call runs (after fusion by need, passes/fuse.py)
            "stages": self._runner.stage_count() if self._runner is not None else None,
        }

    def summary(self) -> str:
        """A short human-readable table of what the cache did since the last ``reset_stats()``:
        calls, actions by kind per branch, computed fraction, fallbacks with reasons, cache memory."""
        from .summary import format_summary

        return format_summary(self.policy, self.stats(), self.trace)

    def reset_stats(self) -> None:
        """Zero the statistics and the trace (caches and position are kept)."""
        self._reset_counters()
        self.trace.clear()

    # ---- the per-call path (called by StageRunner) ---------------------------------------
    def _reset_counters(self) -> None:
        self._calls = 0
        self._flops_run = 0
        self._flops_full = 0
        self._actions: Counter[str] = Counter()
        self._fallbacks: Counter[str] = Counter()
        self._non_finite_count = 0
        self._flop_notes: dict[str, Any] = {}
        self._bypassed_calls = 0
        self._signature: tuple | None = None
        self._computed_this_step = set()
        self._step: int | None = None

    def _bind(self, runner: Any) -> None:
        if self._runner is runner:
            return
        if self._runner is not None and runner.model_key != self._runner.model_key:
            # Two models would share step tracking and caches: a residual of one model
            # standing in for the other's blocks is exactly the silent wrong output we refuse.
            raise RuntimeError(
                "this CacheSession already drives another model; create one CacheSession per model "
                "(mixcache_compile.enable does this for you)"
            )
        if self._runner is not None:
            # A new graph (a recompile after a shape change): caches of the old one are stale.
            self._store.clear()
        self._runner = runner
        self._needs = self.policy.needs(runner.model_info)

    def _run_call(self, runner: Any, args: Sequence[Any]) -> tuple[Any, ...]:
        self._bind(runner)
        ctx = getattr(self._local, "ctx", None)
        explicit_step = ctx is not None and ctx.step_index is not None
        pos = self._tracker.resolve(ctx, None if explicit_step else runner.inputs.timestep_value(args))
        if pos.new_generation:
            self._new_generation()
        sig = runner.inputs.user_signature(args)
        if self._signature is not None and sig != self._signature:
            self._store.clear()  # shape/dtype changed: nothing cached may be reused
            self._warn_once("signature", "input shapes or dtypes changed mid-generation: caches dropped, computing in full")
        self._signature = sig
        if pos.step is not None and pos.step != self._step:
            self._computed_this_step = set()
        self._step = pos.step
        call = _Call(pos, self._observation(pos))
        call.requested, call.action, call.reason = self._decide(runner, call)
        sig_id = runner.intern(sig)
        outputs, flops = self._execute(runner, args, sig_id, call)
        self._account(runner, args, sig_id, call, flops)
        return tuple(outputs)

    def _observation(self, pos: CallPosition) -> Observation | None:
        if pos.step is None:
            return None
        return Observation(
            step=pos.step,
            num_steps=pos.num_steps,
            branch=pos.branch,
            cfg="batched" if pos.branch == "batch" else ("none" if self.cfg == "none" else "separate"),
            generation=self.generation,
            computed_this_step=frozenset(self._computed_this_step),
        )

    def _new_generation(self) -> None:
        self.generation += 1
        self._store.clear()
        self._finite.clear()
        self.policy.reset()
        self._computed_this_step = set()
        self._signature = None  # a new shape in a new generation is not a mid-generation change

    def _decide(self, runner: Any, call: _Call) -> tuple[Action, Action, str | None]:
        if call.obs is None:
            self._warn_once("nostep", "no step context and no timestep input: every call computes in full")
            return FULL, FULL, "no step information"
        requested = self.policy.decide(call.obs)
        if not isinstance(requested, Action):
            raise TypeError(f"policy {self.policy.name!r} returned {requested!r}, not an Action")
        reason = self._unavailable(runner, call.pos, requested)
        return requested, (FULL if reason else requested), reason

    def _unavailable(self, runner: Any, pos: CallPosition, action: Action, after_probe: int | None = None) -> str | None:
        """Why ``action`` cannot run now (then the call computes in full), or None."""
        reason = self._missing(runner, pos, action, after_probe)
        if reason is None and self.check_finite:
            reason = self._non_finite(pos.branch, action)
        return reason

    def _non_finite(self, branch: str, action: Action) -> str | None:
        """Note [non-finite caches]: a NaN/Inf in a tensor an action would reuse makes the call
        compute in full (and the next computed call overwrites the cache). The flags were
        computed when the tensors were stored (Note [finite flags off the per-call path])."""
        kind = action.kind
        if kind is ActionKind.STEP:
            prefixes = [("out", branch), ("fresh_prev", branch)]
        elif kind is ActionKind.CFG:
            prefixes = [("delta",)] + ([("out", "cond")] if branch == "uncond" else [])
            if branch == "batch":
                prefixes += part_prefixes(COND_HALF, action.part)
        elif kind in (ActionKind.BLOCK, ActionKind.ATTN):
            prefixes = part_prefixes(branch, action)
        else:
            return None
        all_finite = True
        for prefix in prefixes:
            tensors = self._cached_list(prefix)
            if not tensors:
                continue
            flag = self._finite.get(prefix)
            if flag is None:  # stored by a path that keeps no flag: compute it now (one read)
                flag = self._finite[prefix] = FiniteFlag(tensors)
            if not flag.all_finite():
                all_finite = False
                break
        # Note [rank-consistent decisions]: every rank of the group falls back, or none does.
        if not agree_all(all_finite, self.process_group):
            self._non_finite_count += 1
            return "non-finite cached tensor"
        return None

    def _missing(self, runner: Any, pos: CallPosition, action: Action, after_probe: int | None) -> str | None:
        """Why the caches ``action`` needs are absent or do not fit, or None."""
        store, b, info = self._store, pos.branch, runner.model_info
        kind = action.kind
        if kind is ActionKind.FULL:
            return None
        if kind is ActionKind.PROBE:
            probe = (self._needs or CacheNeeds()).probe
            if after_probe is not None:
                return "a probe cannot ask for another probe"
            if probe is None:
                return f"policy {self.policy.name!r} asked for a probe but declares none in needs()"
            return runner.probe_available(probe.kind, probe.blocks)
        if kind is ActionKind.STEP:
            return None if store.has(("out", b, 0)) else "no cached output for this branch"
        if kind is ActionKind.CFG:
            if after_probe is not None:
                return "CFG reuse cannot follow a probe"
            if b == "cond":
                return "CFG reuse applies to the unconditional branch"
            if not store.has(("delta", 0)):
                return "no cached CFG difference"
            if b == "uncond":  # Note [action table]: a part is moot on a separate uncond call
                return None if "cond" in self._computed_this_step else "cond branch not computed at this step"
            if not info.half_batch_available:
                return "half batch unavailable (batch dim not symbolic)"
            reason = part_missing(self._store, info, COND_HALF, action.part, None)
            return None if reason is None else f"cond half: {reason}"
        if kind in (ActionKind.BLOCK, ActionKind.ATTN):
            return part_missing(self._store, info, b, action, after_probe)
        return f"unknown action {action}"

    # ---- execution -----------------------------------------------------------------------
    def _execute(self, runner: Any, args: Sequence[Any], sig: int, call: _Call) -> tuple[list[Any], int]:
        b, action = call.pos.branch, call.action
        if action.kind is ActionKind.STEP:
            return self._reused_outputs(b, call.obs), 0
        if action.kind is ActionKind.CFG and b == "uncond":
            outs = [self._rebuild_uncond(c, i, call.obs) for i, c in enumerate(self._cached_list(("out", "cond")))]
            self._record_outputs(b, outs, computed=False, call=call)
            return outs, 0
        needs = self._needs or CacheNeeds()
        if action.kind is ActionKind.CFG:  # batched: compute the cond half only, as its part says
            part = self.batch_order.index("cond")
            half = runner.inputs.half_batch_args(args, part)
            inner = action.part
            attn = {g: self._attention_for(COND_HALF, g, call.obs) for g in inner.attn_blocks}
            ranges, blocks = (needs.ranges, needs.attn_blocks) if needs.cond_half else (set(), set())
            cond, flops, new_res, new_attn = runner.run_graph(
                half, runner.intern(runner.inputs.user_signature(half)), inner, self._residuals_of(COND_HALF), attn, ranges, blocks
            )
            self._record_internal(COND_HALF, new_res, new_attn, call, deviations=False)
            outs = []
            for i, c in enumerate(cond):
                if not isinstance(c, torch.Tensor):
                    outs.append(c)
                    continue
                u = self._rebuild_uncond(c, i, call.obs)
                outs.append(torch.cat([u, c] if part == 1 else [c, u], dim=0))
            self._record_outputs(b, outs, computed=False, call=call)
            return outs, flops
        attn: dict[int, list[torch.Tensor]]
        if action.kind is ActionKind.ATTN:
            attn = {g: self._attention_for(b, g, call.obs) for g in action.attn_blocks}
        else:  # a prologue probe may pick ATTN: fetch what it picks when the blocks ask
            attn = OnDemand(lambda g: self._attention_for(b, g, call.obs))
        probe = self._probe_run(runner, call) if action.kind is ActionKind.PROBE else None
        outs, flops, new_res, new_attn = runner.run_graph(
            args, sig, FULL if probe else action, self._residuals_of(b), attn, needs.ranges, needs.attn_blocks, probe
        )
        self._record_internal(b, new_res, new_attn, call, deviations=True)
        if b == "batch" and needs.cond_half:
            self._record_cond_half(new_res, new_attn, call)
        if outs is None:  # a probe decided to reuse the whole call
            return self._reused_outputs(b, call.obs), flops
        self._record_outputs(b, outs, computed=True, call=call)
        self._computed_this_step.add(b)
        return outs, flops

    def _record_internal(self, branch: str, new_res: dict, new_attn: dict, call: _Call, deviations: bool) -> None:
        """Keep the residuals and attention outputs a call computed, under ``branch``."""
        needs = self._needs or CacheNeeds()
        for rng, values in new_res.items():
            if deviations:
                self._deviation(call, f"block:{rng[0]}-{rng[1]}", values[0], ("res", branch, *rng, 0))
            self._put_list(("res", branch, *rng), values)
        for g, values in new_attn.items():
            if needs.history >= 2:
                for i in range(len(values)):
                    self._store.rotate(("attn", branch, g, i), ("attn_prev", branch, g, i))
            self._put_list(("attn", branch, g), values)

    def _record_cond_half(self, new_res: dict, new_attn: dict, call: _Call) -> None:
        """A full batch call also feeds the cond half's history (Note [action table]). Every
        recorded tensor is batch-first with both halves; one that is not is left out (its
        composite action then falls back for want of a cache, never reading a wrong slice)."""
        part = self.batch_order.index("cond")

        def halves(values: list[torch.Tensor]) -> list[torch.Tensor] | None:
            if not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] % 2 == 0 for v in values):
                return None
            return [v.chunk(2, dim=0)[part] for v in values]

        res = {rng: h for rng, v in new_res.items() if (h := halves(v)) is not None}
        attn = {g: h for g, v in new_attn.items() if (h := halves(v)) is not None}
        self._record_internal(COND_HALF, res, attn, call, deviations=False)

    def _probe_run(self, runner: Any, call: _Call) -> ProbeRun:
        probe = self._needs.probe
        key = ("probe", call.pos.branch)

        def decide(indicator: torch.Tensor, value: torch.Tensor) -> Action:
            # [numerator, denominator] of a rel-L1, summed over ranks, then one device fetch.
            num, den = reduce_ratio(indicator, value.numel(), self.process_group)
            call.indicator = num / den if den else (math.inf if num else math.nan)
            if math.isnan(call.indicator):  # Note [non-finite caches]: no decision on a NaN
                self._non_finite_count += 1
                call.requested, call.action, call.reason = FULL, FULL, "non-finite indicator"
                return FULL
            requested = self.policy.after_probe(call.obs, call.indicator)
            if not isinstance(requested, Action):
                raise TypeError(f"policy {self.policy.name!r} after_probe returned {requested!r}, not an Action")
            limit = probe.blocks if probe.kind == "blocks" else 0
            reason = self._unavailable(runner, call.pos, requested, after_probe=limit)
            call.requested, call.action, call.reason = requested, (FULL if reason else requested), reason
            if probe.update == "always" or call.action.kind is ActionKind.FULL:
                self._store.put(key, value)
            return call.action

        return ProbeRun(probe.kind, probe.blocks, self._store.get(key), decide)

    def _residuals_of(self, branch: str) -> Any:
        return lambda rng: self._cached_list(("res", branch, *rng))

    def _attention_for(self, branch: str, block: int, obs: Observation | None) -> list[torch.Tensor]:
        current = self._cached_list(("attn", branch, block))
        hook = getattr(self.policy, "reuse_attention", None)
        if hook is None:
            return current
        previous = self._cached_list(("attn_prev", branch, block)) or None
        return list(hook(block, current, previous, obs))

    def _reused_outputs(self, branch: str, obs: Observation | None) -> list[Any]:
        hook = getattr(self.policy, "reuse_output", None)
        needs = self._needs or CacheNeeds()
        if hook is not None and needs.history >= 2:
            current = self._cached_list(("fresh", branch)) or self._cached_list(("out", branch))
            previous = self._cached_list(("fresh_prev", branch)) or None
            return list(hook(current, previous, obs))
        # A clone, so a caller that modifies what it is returned cannot corrupt the cache.
        return [t.clone() for t in self._cached_list(("out", branch))]

    def _record_outputs(self, branch: str, outs: list[Any], computed: bool, call: _Call) -> None:
        """Keep this branch's output (for STEP and CFG reuse); on computed calls, refresh the
        CFG difference from the two branches of one step (never from a rebuilt branch)."""
        needs = self._needs or CacheNeeds()
        if not (needs.outputs or needs.cfg_delta or needs.deviations):
            return
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        if computed and tensors:
            self._deviation(call, "step", tensors[0], ("fresh" if needs.history >= 2 else "out", branch, 0))
        self._put_list(("out", branch), outs)
        if computed and needs.history >= 2:
            for i in range(len(tensors)):
                self._store.rotate(("fresh", branch, i), ("fresh_prev", branch, i))
            previous = self._finite.pop(("fresh", branch), None)
            if previous is not None:
                self._finite[("fresh_prev", branch)] = previous
            self._put_list(("fresh", branch), outs)
        if not (needs.cfg_delta and computed):
            return
        if branch == "uncond" and "cond" in self._computed_this_step:
            cond = self._cached_list(("out", "cond"))
            deltas = [u - c for u, c in zip(tensors, cond)]
        elif branch == "batch":
            part = self.batch_order.index("cond")
            deltas = [halves[1 - part] - halves[part] for halves in (o.chunk(2, dim=0) for o in tensors)]
        else:
            return
        if deltas:
            self._deviation(call, "cfg", deltas[0], ("delta", 0))
        self._put_list(("delta",), deltas)

    def _deviation(self, call: _Call, name: str, new: torch.Tensor, old_key: tuple) -> None:
        """rel-L1 of a freshly recorded tensor against its previous fresh copy (kept on the
        device; all of a call's deviations are fetched together once in ``_account``)."""
        if not (self._needs and self._needs.deviations):
            return
        old = self._store.get(old_key)
        if old is not None and old.shape == new.shape:
            call.deviations[name] = (new - old).abs().mean() / (old.abs().mean() + 1e-12)

    def _rebuild_uncond(self, cond: Any, i: int, obs: Observation | None) -> Any:
        """Default CFG rebuild: ``eps_u = eps_c + (eps_u - eps_c)`` from the last step that computed both.
        Policies with another rule (FasterCache's frequency split) provide ``rebuild_uncond``."""
        if not isinstance(cond, torch.Tensor):
            return cond
        delta = self._store.get(("delta", i))
        custom = getattr(self.policy, "rebuild_uncond", None)
        return custom(cond, delta, obs) if custom else cond + delta

    def _cached_list(self, prefix: tuple) -> list[torch.Tensor]:
        values, i = [], 0
        while (t := self._store.get((*prefix, i))) is not None:
            values.append(t)
            i += 1
        return values

    def _put_list(self, prefix: tuple, values: list[Any]) -> None:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        for i, v in enumerate(tensors):
            self._store.put((*prefix, i), v)
        if self.check_finite and tensors:
            self._finite[prefix] = FiniteFlag(tensors)

    def _account(self, runner: Any, args: Sequence[Any], sig: int, call: _Call, flops: int) -> None:
        action, requested, reason = call.action, call.requested, call.reason
        if action.kind is ActionKind.FULL and call.indicator is None and sig not in runner._full_flops:
            runner._full_flops[sig] = flops
        self._calls += 1
        self._flops_run += flops
        self._flops_full += runner.full_flops(args, sig)
        if runner.flop_notes:
            self._flop_notes.update(runner.flop_notes)
        self._actions[action.kind.value] += 1
        if reason:
            self._fallbacks[reason] += 1
            if requested.kind is not ActionKind.FULL:
                log.info("step %s %s: %s -> FULL (%s)", call.pos.step, call.pos.branch, requested, reason)
        pos = call.pos
        self.trace.append(TraceEntry(self.generation, pos.step, pos.branch, str(action), str(requested), reason, call.indicator))
        observe = getattr(self.policy, "observe", None)
        if observe is not None:
            names = list(call.deviations)
            values = reduce_mean(torch.stack([call.deviations[n].float() for n in names]), self.process_group).tolist() if names else []
            observe(CallReport(pos.step, pos.branch, action, reason, call.indicator, dict(zip(names, values))))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"mixcache: {message}", stacklevel=3)
