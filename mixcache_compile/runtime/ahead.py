"""The session's side of calls answered in the model's entry (runtime/shortcut.py, Note
[answered ahead]): decide before any graph runs, answer what needs no graph, and run a
prologue probe ahead so that a call the probe skips never enters Dynamo either.

Note [probe ahead]: TeaCache-like policies decide each call from an indicator computed by
the probe head (the modulation's ancestors, ``passes/probe_split.py``), the first fused group.
Its inputs are graph inputs only (the timestep, the time-embedding parameters), which the
entry fetches by their Dynamo sources, so the group runs here, on the same compiled stage the
fused path runs. A reuse it decides is answered at once; anything else is handed to the
runner with the group's outputs (``ProbedAhead``), and the fused path resumes after the group,
so the probe runs once either way. The probe head runs without Dynamo's guards: its value
decides, it never is an output; every call that computes goes through Dynamo and its guards,
and parameters are read through their sources on every call (a model changed in place is
seen; one whose structure changed within a generation is seen at its next computed call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..policies.actions import Runs, describe
from ..policies.protocol import FULL
from .request import GraphRequest

GraphInputs = Callable[[Sequence[int]], Sequence[Any]]


def answer_ahead(session: Any, runner: Any, sig: tuple, timestep: Callable[[], float | None],
                 graph_inputs: GraphInputs | None) -> list[Any] | None:
    """``CacheSession.answer_ahead``: outputs if the call needs no graph (or its probe, run
    ahead, decided a reuse), else None with the decided call left pending for the runner."""
    if session._call_hooks or runner is not session._runner:
        return None  # (a runner not bound: the shortcut learns the bound one first)
    sig_id = runner.intern(sig)
    full_flops = runner.known_full_flops(sig_id)
    if full_flops is None:
        return None
    ctx = session.current_context()
    call = session._open_call(runner, ctx, None if ctx is not None and ctx.step_index is not None else timestep(), sig)
    branch = call.pos.branch
    runs = describe(call.action, branch).runs
    if runs in (Runs.NOTHING, Runs.REBUILD):
        outputs, flops = session._execute(runner, (), sig_id, call)
        session._close_call(runner, call, flops, full_flops)
        return outputs
    resumed = None
    path = runner.fused_path() if runs is Runs.PROBE and graph_inputs is not None else None
    slots = path.probe_ahead_inputs if path is not None else None
    if slots is not None:  # Note [probe ahead]
        probe = session._probe_run(runner, call)
        request = GraphRequest(FULL, branch, session._residuals_of(branch), {}, session._record_set, probe)
        if path.accepts(request):
            decided, resumed = path.probe_ahead(runner, sig_id, dict(zip(slots, graph_inputs(slots))), probe)
            if describe(decided, branch).runs is Runs.NOTHING:
                outputs = session._reused_outputs(branch, call.obs)
                session._close_call(runner, call, resumed.flops, full_flops)
                return outputs
    session._local.pending = (runner, call, resumed)
    return None
