"""``CacheSession``: the state of one denoising run, kept outside every compiled graph.

It holds the step/branch tracker, the policy, the cache records (``records.py``), the
decision trace and the statistics (``accounting.py``). Python state in the callable a
backend returns is not guarded by Dynamo, so keeping it here (never on the ``nn.Module``) is
what keeps the graph free of recompiles. What each action reads, needs and records is its
description (``policies/actions.py``, Note [action table]); this file runs it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..policies import DEFAULT_POLICY, PolicyConfig, make_policy
from ..policies.actions import Cache, CacheRef, ActionSpec, Runs, describe
from ..policies.base import hooks_of
from ..policies.protocol import COND_HALF, FULL, Action, ActionKind, CacheNeeds, Observation, Policy, Recorded
from .accounting import Accounting, Call, TraceEntry
from .actions import Situation, refusal
from .context import CallContext, CallPosition, StepTracker
from .distributed import reduce_ratio
from .records import CacheRecords
from .ahead import answer_ahead
from .request import NOTHING, GraphRequest, OnDemand, ProbedAhead, ProbeRun, RecordSet
from .trace_log import DEFAULT_TRACE_LIMIT, TraceLog

_CFG_MODES = ("auto", "separate", "batched", "none")
# A hook run at the start of every call, before the session changes any state:
# ``hook(runner, flat_args, context)`` (export capture records the calls with it).
CallHook = Callable[[Any, Sequence[Any], "CallContext | None"], None]


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
        self._hooks = hooks_of(self.policy)  # the optional hooks, defaults filled in once
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self._records = CacheRecords(check_finite)
        self._store = self._records.store
        self.cfg = cfg
        self.batch_order = tuple(batch_order)
        self._tracker = StepTracker(cfg, tuple(branch_order))
        self._local = threading.local()
        self._runner: Any = None
        self._needs = CacheNeeds()
        self._record_set = NOTHING  # what computed calls record, from the needs (built once per bind)
        self._call_hooks: list[CallHook] = []
        self._runners_by_key: dict[tuple, Any] = {}  # the backend's runners (runner_for)
        self.compiled: torch.nn.Module | None = None  # enable(): the compiled module (a bare model's handle)
        self._accounting = Accounting()
        self._warned: set[str] = set()
        # The ranks that share one sequence (Note [rank-consistent decisions]); None = world.
        # Set by mixcache_compile.parallel for models with diffusers context parallelism.
        self.process_group: Any = None
        self.trace: TraceLog[TraceEntry] = TraceLog(trace_limit)
        self.generation = 0
        self._reset_position()

    # ---- public API --------------------------------------------------------------------
    @property
    def check_finite(self) -> bool:
        return self._records.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self._records.check_finite = value

    def reset(self) -> None:
        """Forget the current generation: caches freed, tracker and policy reset."""
        self._records.clear()
        self._tracker.reset()
        self.policy.reset()
        self._signature = None
        self._computed_this_step: set[str] = set()

    def add_call_hook(self, hook: CallHook) -> None:
        """Run ``hook(runner, flat_args, context)`` at the start of every call (before the
        session changes any state). ``context``: ``current_context()`` at that call."""
        self._call_hooks.append(hook)

    def runner_for(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The runner built for ``key`` (model, engine, graph, inputs), made once by ``make``:
        an equal graph traced again gets the same runner, so nothing compiles twice and the
        caches survive (the backend form traces a model twice)."""
        if key not in self._runners_by_key:
            self._runners_by_key[key] = make()
        return self._runners_by_key[key]

    def runners(self) -> tuple[Any, ...]:
        """The runners ``runner_for`` built (one per distinct traced graph of the backend form)."""
        return tuple(self._runners_by_key.values())

    def bind_model(self, model: torch.nn.Module) -> None:
        """Tell the policy which model it serves (``PolicyBase.bind_model``)."""
        self._hooks.bind_model(model)

    @property
    def may_answer_ahead(self) -> bool:
        """Whether any call could run no graph: the needs record outputs (step reuse) or the
        CFG difference (rebuild). Policy ``none`` and graph-only policies never do."""
        return self._needs.outputs or self._needs.cfg_delta

    @property
    def bound_runner(self) -> Any:
        """The runner of the graph this session last ran (None before the first call)."""
        return self._runner

    def current_context(self) -> CallContext | None:
        """What ``set_context`` / ``context`` said about the next call(s) on this thread."""
        return getattr(self._local, "ctx", None)

    def expects_batch(self) -> bool:
        """Whether the next call carries both CFG branches in one batch."""
        ctx = self.current_context()
        return bool((ctx is not None and ctx.batched) or self.cfg == "batched")

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
        counted, store = self._accounting.stats(), self._store
        return {
            **{k: counted[k] for k in ("calls", "computed_fraction", "flops_run", "flops_full", "actions", "fallbacks",
                                       "non_finite", "bypassed_calls")},
            "generations": self.generation + (1 if counted["calls"] else 0),
            "cache_bytes": store.nbytes(),
            "cache_peak_bytes": store.peak_bytes,
            "cache_allocations": store.allocations,
            "flops_unknown": counted["flops_unknown"],
            "flops_from_real_tensors": counted["flops_from_real_tensors"],
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
        self._accounting.reset()
        self._reset_position()
        self.trace.clear()


    # ---- the per-call path (called by StageRunner) ---------------------------------------
    def _reset_position(self) -> None:
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
            self._records.clear()
        self._runner = runner
        self._needs = self.policy.needs(runner.model_info)
        self._records.needs = self._needs
        self._record_set = RecordSet.of(self._needs)
        runner.set_needs(self._needs)

    def _run_call(self, runner: Any, args: Sequence[Any]) -> tuple[Any, ...]:
        ctx = self.current_context()
        for hook in self._call_hooks:
            hook(runner, args, ctx)
        self._bind(runner)
        sig = runner.inputs.user_signature(args)
        call, resumed = self._take_pending(runner)
        if call is None:
            explicit_step = ctx is not None and ctx.step_index is not None
            call = self._open_call(runner, ctx, None if explicit_step else runner.inputs.timestep_value(args), sig)
        sig_id = runner.intern(sig)
        outputs, flops = self._execute(runner, args, sig_id, call, resumed)
        self._close_call(runner, call, flops, runner.full_flops(args, sig_id))
        return tuple(outputs)

    def _open_call(self, runner: Any, ctx: CallContext | None, timestep: float | None, sig: tuple) -> Call:
        """Where the call is in the loop (a new generation drops every cache), the signature
        check, and the policy's decision."""
        pos = self._tracker.resolve(ctx, timestep)
        if pos.new_generation:
            self._new_generation()
        if self._signature is not None and sig != self._signature:
            self._records.clear()  # shape/dtype changed: nothing cached may be reused
            self._warn_once("signature", "input shapes or dtypes changed mid-generation: caches dropped, computing in full")
        self._signature = sig
        if pos.step is not None and pos.step != self._step:
            self._computed_this_step = set()
        self._step = pos.step
        call = Call(pos, self._observation(pos))
        call.requested, call.action, call.reason = self._decide(runner, call)
        return call

    def _close_call(self, runner: Any, call: Call, flops: int, full_flops: int) -> None:
        report = self._accounting.account(call, flops, full_flops, runner.flop_notes, self.generation,
                                          self.trace, self.process_group)
        self._hooks.observe(report)

    # ---- calls answered ahead, in the model's entry frame (runtime/shortcut.py) ----------
    def answer_ahead(self, runner: Any, sig: tuple, timestep: Callable[[], float | None],
                     graph_inputs: Callable[[Sequence[int]], Sequence[Any]] | None = None) -> list[Any] | None:
        """Note [answered ahead]: decide the next call before any graph runs. If its action
        runs no graph (a step reuse, a CFG rebuild), or its prologue probe, run here on
        ``graph_inputs`` (placeholder indices -> values), decides a reuse (Note [probe ahead]),
        return its outputs; else keep the decided call for the runner the compiled frame
        reaches next and return None. Declines (None, nothing decided) when the call is not
        this session's usual one: call hooks, another runner bound, a new signature."""
        return answer_ahead(self, runner, sig, timestep, graph_inputs)

    def _take_pending(self, runner: Any) -> tuple[Call | None, ProbedAhead | None]:
        """The call ``answer_ahead`` decided for this thread, if any, and its probe run ahead.
        Reached by another runner (Dynamo recompiled in between, and binding it dropped the
        caches), its action is checked again and computes in full if no longer available; a
        probe run ahead on the other runner is not resumed (the call runs from the start;
        that probe's FLOPs are not counted)."""
        pending = getattr(self._local, "pending", None)
        if pending is None:
            return None, None
        self._local.pending = None
        decided_for, call, resumed = pending
        if decided_for is not runner:
            resumed = None
            if call.obs is not None and self._unavailable(runner, call.pos, call.action) is not None:
                call.action, call.reason = FULL, "decided for another graph"
        return call, resumed

    def pending_call(self, runner: Any) -> Call | None:
        """The call ``answer_ahead`` decided for ``runner`` on this thread, not yet taken."""
        pending = getattr(self._local, "pending", None)
        return pending[1] if pending is not None and pending[0] is runner else None

    def drop_pending(self) -> None:
        """Forget a call decided ahead that no runner took (the model's entry calls this after
        every compiled call; such a call was a bypass, which the entry counts)."""
        self._local.pending = None

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
            recorded=dict(self._records.recorded),
        )

    def _new_generation(self) -> None:
        self.generation += 1
        self._records.clear()
        self.policy.reset()
        self._computed_this_step = set()
        self._signature = None  # a new shape in a new generation is not a mid-generation change

    # ---- decision ------------------------------------------------------------------------
    def _decide(self, runner: Any, call: Call) -> tuple[Action, Action, str | None]:
        if call.obs is None:
            self._warn_once("nostep", "no step context and no timestep input: every call computes in full")
            return FULL, FULL, "no step information"
        requested = self.policy.decide(call.obs)
        if not isinstance(requested, Action):
            raise TypeError(f"policy {self.policy.name!r} returned {requested!r}, not an Action")
        reason = self._unavailable(runner, call.pos, requested)
        return requested, (FULL if reason else requested), reason

    def _unavailable(self, runner: Any, pos: CallPosition, action: Action, after_probe: int | None = None) -> str | None:
        """Why ``action`` cannot run now (then the call computes in full), or None: the first
        requirement of its description that fails, then Note [non-finite caches]: a NaN/Inf
        in a tensor it would read (the next computed call overwrites the cache)."""
        spec = describe(action, pos.branch)
        now = Situation(self._records, runner.model_info, pos.step, after_probe, lambda: self._probe_refusal(runner))
        reason = refusal(spec, now)
        if reason is None and self.check_finite and not self._records.all_finite(spec.reads, self.process_group):
            self._accounting.non_finite += 1
            reason = "non-finite cached tensor"
        return reason

    def _probe_refusal(self, runner: Any) -> str | None:
        probe = self._needs.probe
        if probe is None:
            return f"policy {self.policy.name!r} asked for a probe but declares none in needs()"
        return runner.probe_available(probe.kind, probe.blocks)

    def _probe_run(self, runner: Any, call: Call) -> ProbeRun:
        probe = self._needs.probe
        previous = self._records.values(CacheRef(Cache.PROBE, call.pos.branch))
        return ProbeRun(probe.kind, probe.blocks, previous[0] if previous else None, _ProbeDecision(self, runner, call))

    # ---- execution: what the action's description says it runs ----------------------------
    def _execute(self, runner: Any, args: Sequence[Any], sig: int, call: Call,
                 resumed: ProbedAhead | None = None) -> tuple[list[Any], int]:
        b, obs = call.pos.branch, call.obs
        spec = describe(call.action, b)
        if spec.runs is Runs.NOTHING:
            return self._reused_outputs(b, obs), 0
        if spec.runs is Runs.REBUILD:
            outs = [self._rebuild_uncond(c, i, obs) for i, c in enumerate(self._records.values(CacheRef(Cache.OUTPUT, "cond")))]
            self._record_outputs(b, outs, call, spec)
            return outs, 0
        if spec.runs is Runs.HALF:
            return self._execute_half(runner, args, call, spec)
        attn: dict[int, list[torch.Tensor]]
        if spec.reuses_attention:
            attn = {g: self._attention_for(b, g, obs) for g in spec.reuses_attention}
        else:  # a prologue probe may pick ATTN: fetch what it picks when the blocks ask
            attn = OnDemand(lambda g: self._attention_for(b, g, obs))
        probe = self._probe_run(runner, call) if spec.runs is Runs.PROBE else None
        # resumed (Note [probe ahead]): the probe ran and decided ``call.action``; no probe here
        request = GraphRequest(FULL if probe else call.action, b, self._residuals_of(b), attn, self._record_set, probe, resumed)
        outs, flops, new_res, new_attn = runner.run_graph(args, sig, request)
        stamp = Recorded(call.pos.step, True, call.action.kind is ActionKind.FULL)
        self._records.record_internal(b, new_res, new_attn, stamp, call.deviations)
        if b == "batch" and self._needs.cond_half:
            self._records.record_cond_half(self.batch_order.index("cond"), new_res, new_attn, stamp)
        if outs is None:  # a probe decided to reuse the whole call
            return self._reused_outputs(b, obs), flops
        self._record_outputs(b, outs, call, describe(call.action, b))
        self._computed_this_step.add(b)
        return outs, flops

    def _execute_half(self, runner: Any, args: Sequence[Any], call: Call, spec: ActionSpec) -> tuple[list[Any], int]:
        """A batch call that computes the cond half as the action's part says and rebuilds
        the uncond half from it."""
        part, inner = self.batch_order.index("cond"), spec.part
        half = runner.inputs.half_batch_args(args, part)
        attn = {g: self._attention_for(COND_HALF, g, call.obs) for g in inner.reuses_attention}
        record = self._record_set if self._needs.cond_half else NOTHING
        request = GraphRequest(inner.action, COND_HALF, self._residuals_of(COND_HALF), attn, record)
        cond, flops, new_res, new_attn = runner.run_graph(half, runner.intern(runner.inputs.user_signature(half)), request)
        stamp = Recorded(call.pos.step, True, inner.action.kind is ActionKind.FULL)
        self._records.record_internal(COND_HALF, new_res, new_attn, stamp, None)
        outs = []
        for i, c in enumerate(cond):
            if not isinstance(c, torch.Tensor):
                outs.append(c)
                continue
            u = self._rebuild_uncond(c, i, call.obs)
            outs.append(torch.cat([u, c] if part == 1 else [c, u], dim=0))
        self._record_outputs(call.pos.branch, outs, call, spec)
        return outs, flops

    def _record_outputs(self, branch: str, outs: list[Any], call: Call, spec: ActionSpec) -> None:
        """Keep the call's output as its description says (computed or rebuilt); a computed
        one also refreshes the CFG difference from the two branches of one step (never from
        a rebuilt branch)."""
        computed = spec.output == "computed"
        stamp = Recorded(call.pos.step, computed, computed and call.action.kind is ActionKind.FULL)
        deltas, delta_stamp = None, None
        if self._needs.cfg_delta and spec.records_delta:
            tensors = [o for o in outs if isinstance(o, torch.Tensor)]
            cond_ref = CacheRef(Cache.OUTPUT, "cond")
            if branch == "uncond" and self._records.fresh(cond_ref, call.pos.step):
                deltas = [u - c for u, c in zip(tensors, self._records.values(cond_ref))]
                delta_stamp = Recorded(call.pos.step, True, stamp.exact and self._records.recorded[cond_ref.name].exact)
            elif branch == "batch":
                part = self.batch_order.index("cond")
                deltas = [halves[1 - part] - halves[part] for halves in (o.chunk(2, dim=0) for o in tensors)]
                delta_stamp = stamp
        self._records.record_outputs(branch, outs, stamp, deltas, delta_stamp, call.deviations)

    def _residuals_of(self, branch: str) -> Callable[[tuple[int, int]], list[torch.Tensor]]:
        return lambda rng: self._records.values(CacheRef(Cache.RESIDUAL, branch, rng))

    def _attention_for(self, branch: str, block: int, obs: Observation | None) -> list[torch.Tensor]:
        current = self._records.values(CacheRef(Cache.ATTENTION, branch, (block,)))
        previous = self._records.values(CacheRef(Cache.ATTENTION_PREV, branch, (block,))) or None
        return list(self._hooks.reuse_attention(block, current, previous, obs))

    def _reused_outputs(self, branch: str, obs: Observation | None) -> list[Any]:
        values = self._records.values
        if self._needs.history >= 2:
            current = values(CacheRef(Cache.COMPUTED, branch)) or values(CacheRef(Cache.OUTPUT, branch))
            previous = values(CacheRef(Cache.OUTPUT_PREV, branch)) or None
        else:
            current, previous = values(CacheRef(Cache.OUTPUT, branch)), None
        return list(self._hooks.reuse_output(current, previous, obs))

    def _rebuild_uncond(self, cond: Any, i: int, obs: Observation | None) -> Any:
        """The uncond output from the cond one and the CFG difference of the last step that
        computed both (the policy's ``rebuild_uncond``; default ``cond + delta``)."""
        if not isinstance(cond, torch.Tensor):
            return cond
        return self._hooks.rebuild_uncond(cond, self._records.get(CacheRef(Cache.DELTA), i), obs)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"mixcache: {message}", stacklevel=3)


class _ProbeDecision:
    """The ``ProbeRun.decide`` of one call: the indicator's rel-L1 (summed over ranks, one
    device fetch), the policy's ``after_probe``, and the action's availability after the
    probe point; stores the probe's value as the policy's ``Probe.update`` says."""

    def __init__(self, session: CacheSession, runner: Any, call: Call) -> None:
        self.session, self.runner, self.call = session, runner, call

    def __call__(self, indicator: torch.Tensor, value: torch.Tensor) -> Action:
        session, call = self.session, self.call
        probe = session._needs.probe
        num, den = reduce_ratio(indicator, value.numel(), session.process_group)
        call.indicator = num / den if den else (math.inf if num else math.nan)
        if math.isnan(call.indicator):  # Note [non-finite caches]: no decision on a NaN
            session._accounting.non_finite += 1
            call.requested, call.action, call.reason = FULL, FULL, "non-finite indicator"
            return FULL
        requested = session._hooks.after_probe(call.obs, call.indicator)
        if not isinstance(requested, Action):
            raise TypeError(f"policy {session.policy.name!r} after_probe returned {requested!r}, not an Action")
        limit = probe.blocks if probe.kind == "blocks" else 0
        reason = session._unavailable(self.runner, call.pos, requested, after_probe=limit)
        call.requested, call.action, call.reason = requested, (FULL if reason else requested), reason
        if probe.update == "always" or call.action.kind is ActionKind.FULL:
            # its finiteness shows in the next indicator: no flag kept
            session._records.put(CacheRef(Cache.PROBE, call.pos.branch), [value], Recorded(call.pos.step, True, True), flag=False)
        return call.action
