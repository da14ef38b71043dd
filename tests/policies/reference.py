"""An eager, hook-based executor of caching actions over the unmodified diffusers model.

Shares no code with the package. It keeps its own caches, exactly in the runtime's documented
semantics, and reports what the policies observe (deviations, probe indicators):

  full      compute; record the output, the residual of each watched range, the attention
            output of each watched block (last two computed), the CFG difference (uncond -
            cond when both computed at a step, or the halves of a batch call)
  step      return the branch's last output, or ``step_value(last, previous)`` of its last
            two computed outputs (extrapolating policies)
  cfg       separate: rebuild(cond output of this step, stored difference); batched: compute
            the cond half alone and rebuild the uncond half
  cfg+X     batched: as cfg, the cond half running X (block:a-b / attn:...) on the cond half's
            own caches ("batch.cond"); with ``cond_half=True`` full batch calls feed those
            caches with their cond halves, and every cond-half computation records into them
  block:a-b skip blocks [a, b): their outputs are their inputs plus the stored residual
  attn:...  the listed blocks' self-attention returns ``attn_value(block, last, prev)``
  probe     compute the prologue (or the first Fn blocks), measure the indicator, and let
            ``after_probe(indicator)`` choose: full, block:Fn-b, or step (prologue probe)

Deviations (reported after computed calls): ``step`` = rel_l1(new output, last output),
``cfg`` = rel_l1(new difference, old), ``block:a-b`` = rel_l1(new residual, old), with
rel_l1(x, y) = mean|x - y| / (mean|y| + 1e-12).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tests.eager_reference import BlockAdapter


def rel_l1(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().mean() / (y.abs().mean() + 1e-12))


class _SkipRest(Exception):
    """Raised inside the forward when a prologue probe decides to reuse the whole call."""


@dataclass
class Probe:
    kind: str  # "blocks" | "prologue"
    blocks: int = 1
    update: str = "always"


@dataclass
class CallResult:
    output: torch.Tensor
    action: str
    indicator: float | None = None
    deviations: dict[str, float] = field(default_factory=dict)


def _temb(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["temb"] if "temb" in kwargs else args[2]


class Reference:
    def __init__(self, model: torch.nn.Module, adapter: BlockAdapter, watch_ranges=(), watch_attn=(), probe: Probe | None = None,
                 batch_order: tuple[str, str] = ("uncond", "cond"), cond_half: bool = False) -> None:
        self.cond_half = cond_half
        self.model, self.ad = model, adapter
        self.watch_ranges = list(watch_ranges)
        self.watch_attn = list(watch_attn)
        self.probe = probe
        self.batch_order = batch_order
        self.out: dict[str, torch.Tensor] = {}
        self.fresh: dict[str, list[torch.Tensor]] = {}  # last two computed outputs per branch
        self._step_value = None
        self.delta: torch.Tensor | None = None
        self.res: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        self.attn: dict[tuple[str, int], list[Any]] = {}  # [prev, last] computed
        self.probe_prev: dict[str, torch.Tensor] = {}
        self.computed: tuple[int | None, set[str]] = (None, set())

    # ---- one call ---------------------------------------------------------------------------
    @torch.no_grad()
    def call(self, step: int, branch: str, action: str, inputs: dict[str, Any], *,
             rebuild: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             attn_value: Callable[[int, Any, Any | None], Any] | None = None,
             after_probe: Callable[[float], str] | None = None,
             step_value: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None) -> CallResult:
        if self.computed[0] != step:
            self.computed = (step, set())
        rebuild = rebuild or (lambda c, d: c + d)
        self._step_value = step_value
        if action == "step":
            return CallResult(self._reused(branch), "step")
        if action == "cfg" and branch == "uncond":
            out = rebuild(self.out["cond"], self.delta)
            self.out["uncond"] = out.clone()
            return CallResult(out, "cfg")
        if action == "cfg" or action.startswith("cfg+"):
            part = self.batch_order.index("cond")
            half = {k: (v.chunk(2)[part] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in inputs.items()}
            inner = action.partition("+")[2] or "full"
            cond = self._computed_call(step, "batch.cond", inner, half, attn_value, None, keep=self.cond_half).output
            uncond = rebuild(cond, self.delta)
            out = torch.cat([uncond, cond] if part == 1 else [cond, uncond])
            self.out[branch] = out.clone()
            return CallResult(out, action)
        result = self._computed_call(step, branch, action, inputs, attn_value, after_probe)
        return result

    def _reused(self, branch: str) -> torch.Tensor:
        """A skipped call's output: the last output, or ``step_value(last, previous)`` over the
        branch's last two *computed* outputs (never a rebuilt or reused one)."""
        if self._step_value is None:
            return self.out[branch].clone()
        hist = self.fresh[branch]
        return self._step_value(hist[-1], hist[-2] if len(hist) > 1 else None)

    def _keep_cond_half(self, state: "_CallState") -> None:
        part = self.batch_order.index("cond")
        for rng, values in state.new_res.items():
            self.res[("batch.cond", *rng)] = [v.chunk(2)[part] for v in values]
        for g, value in state.new_attn.items():
            half = tuple(v.chunk(2)[part] for v in value) if isinstance(value, tuple) else value.chunk(2)[part]
            hist = self.attn.get(("batch.cond", g), [])
            self.attn[("batch.cond", g)] = (hist + [half])[-2:]

    def _computed_call(self, step, branch, action, inputs, attn_value, after_probe, keep: bool = True) -> CallResult:
        state = _CallState(action=action)
        try:
            with self._hooks(branch, state, attn_value, after_probe):
                out = self.model(**inputs)[0]
        except _SkipRest:
            return CallResult(self._reused(branch), "step", state.indicator)
        if branch == "batch.cond":  # the computed half of a CFG call: keep its caches only
            if keep:
                self._store_internal(branch, state)
            return CallResult(out, state.action)
        if branch == "batch" and self.cond_half:
            self._keep_cond_half(state)
        devs = self._store_internal(branch, state)
        self.fresh[branch] = (self.fresh.get(branch, []) + [out.clone()])[-2:]
        if branch in self.out:
            devs["step"] = rel_l1(out, self.out[branch])
        self.out[branch] = out.clone()
        done = self.computed[1]
        new_delta = None
        if branch == "uncond" and "cond" in done:
            new_delta = out - self.out["cond"]
        elif branch == "batch":
            halves = out.chunk(2)
            part = self.batch_order.index("cond")
            new_delta = halves[1 - part] - halves[part]
        if new_delta is not None:
            if self.delta is not None:
                devs["cfg"] = rel_l1(new_delta, self.delta)
            self.delta = new_delta
        done.add(branch)
        return CallResult(out, state.action, state.indicator, devs)

    def _store_internal(self, branch: str, state: "_CallState") -> dict[str, float]:
        devs: dict[str, float] = {}
        for rng, values in state.new_res.items():
            key = (branch, *rng)
            if key in self.res:
                devs[f"block:{rng[0]}-{rng[1]}"] = rel_l1(values[0], self.res[key][0])
            self.res[key] = values
        for g, value in state.new_attn.items():
            hist = self.attn.get((branch, g), [])
            self.attn[(branch, g)] = (hist + [value])[-2:]
        return devs

    # ---- hooks --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooks(self, branch: str, state: "_CallState", attn_value, after_probe) -> Iterator[None]:
        ad, handles, saved = self.ad, [], []

        def replace(module, fn):
            saved.append((module, module.__dict__.get("forward")))
            module.forward = fn

        def set_skip(action: str) -> None:
            state.action = action
            if action.startswith("block:"):
                a, b = (int(x) for x in action[6:].split("-"))
                state.skip = (a, b)

        if state.action.startswith("block:"):
            set_skip(state.action)
        # Block wrappers that skip when state.skip covers them (decided up front or at the probe).
        n = len(ad.blocks)
        for g in range(n):
            original = ad.blocks[g].forward

            def wrapped(*args, _g=g, _orig=original, **kwargs):
                skip = state.skip
                if skip is None or not (skip[0] <= _g < skip[1]):
                    return _orig(*args, **kwargs)
                streams = ad.streams_in(_g, args, kwargs)
                if _g == skip[0]:
                    res = self.res[(branch, *skip)]
                    streams = [s + r for s, r in zip(streams, res)]
                return ad.make_output(skip[1] - 1, streams)

            replace(ad.blocks[g], wrapped)
        # Attention reuse.
        if state.action.startswith("attn:"):
            for g in (int(x) for x in state.action[5:].split(",")):
                hist = self.attn[(branch, g)]
                value = attn_value(g, hist[-1], hist[-2] if len(hist) > 1 else None) if attn_value else hist[-1]
                state.reused_attn.add(g)
                replace(ad.attention[g], lambda *a, _v=value, **k: _v)
        # Watched ranges: record the residual when the range computes.
        for rng in self.watch_ranges:
            a, b = rng

            def pre(mod, args, kwargs, _r=rng, _a=a):
                if not state.skipping(_a):
                    state.range_in[_r] = [t.clone() for t in ad.streams_in(_a, args, kwargs)]

            def post(mod, args, kwargs, out, _r=rng, _b=b):
                if _r in state.range_in and not state.skipping(_b - 1):
                    outs = ad.streams_out(_b - 1, out)
                    state.new_res[_r] = [o - i for o, i in zip(outs, state.range_in[_r])]

            handles.append(ad.blocks[a].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(ad.blocks[b - 1].register_forward_hook(post, with_kwargs=True))
        for g in self.watch_attn:
            def keep(mod, args, out, _g=g):
                if _g not in state.reused_attn and not state.skipping(_g):
                    state.new_attn[_g] = tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

            handles.append(ad.attention[g].register_forward_hook(keep))
        # Probes.
        if state.action == "probe":
            handles.extend(self._probe_hooks(branch, state, after_probe, set_skip))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for module, fwd in reversed(saved):
                if fwd is not None:
                    module.forward = fwd
                else:
                    del module.forward

    def _probe_hooks(self, branch, state, after_probe, set_skip) -> list:
        probe, ad = self.probe, self.ad
        handles = []

        def decide(value: torch.Tensor) -> None:
            prev = self.probe_prev.get(branch)
            indicator = float("inf") if prev is None else rel_l1(value, prev)
            state.indicator = indicator
            chosen = after_probe(indicator)
            if probe.update == "always" or chosen == "full":
                self.probe_prev[branch] = value.clone()
            set_skip(chosen)
            if chosen == "step":
                raise _SkipRest

        if probe.kind == "prologue":
            handles.append(ad.blocks[0].register_forward_pre_hook(lambda m, a, k: decide(_temb(a, k)), with_kwargs=True))
        else:
            first_in: dict[str, torch.Tensor] = {}

            def pre(mod, args, kwargs):
                first_in["h"] = ad.streams_in(0, args, kwargs)[0].clone()

            def post(mod, args, kwargs, out):
                decide(ad.streams_out(probe.blocks - 1, out)[0] - first_in["h"])

            handles.append(ad.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(ad.blocks[probe.blocks - 1].register_forward_hook(post, with_kwargs=True))
        return handles


@dataclass
class _CallState:
    action: str
    skip: tuple[int, int] | None = None
    indicator: float | None = None
    range_in: dict = field(default_factory=dict)
    new_res: dict = field(default_factory=dict)
    new_attn: dict = field(default_factory=dict)
    reused_attn: set = field(default_factory=set)

    def skipping(self, g: int) -> bool:
        return self.skip is not None and self.skip[0] <= g < self.skip[1]
