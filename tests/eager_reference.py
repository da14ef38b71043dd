"""An independent eager reference of each caching action, over the unmodified model.

Written with plain forward hooks and temporary ``forward`` replacements on the model's own
blocks, sharing no code with the package. It gives, for a sequence of calls with given
actions, the outputs a correct implementation must return:
  FULL   compute; remember this branch's output, the residual of each watched block range,
         the self-attention output of each watched block, and (separate CFG) the difference
         uncond - cond when both branches were computed at one step;
  STEP   return this branch's last output;
  CFG    separate: uncond = this step's cond output + difference; batched: compute the cond
         half alone and rebuild the uncond half the same way;
  BLOCK  skip blocks [a, b): their output streams are the input streams plus the residual;
  ATTN   the listed blocks' self-attention returns the remembered output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BlockAdapter:
    """How a model's blocks take and return their streams (per model family)."""

    blocks: list[torch.nn.Module]
    attention: list[torch.nn.Module]
    # block (args, kwargs) -> input streams in the order the block returns them
    streams_in: Callable[[int, tuple, dict], list[torch.Tensor]]
    # block index, output streams -> what that block returns
    make_output: Callable[[int, list[torch.Tensor]], Any]
    # what a block returned -> output streams
    streams_out: Callable[[int, Any], list[torch.Tensor]]


def _first(args: tuple, kwargs: dict, name: str, pos: int) -> torch.Tensor:
    return kwargs[name] if name in kwargs else args[pos]


def wan_adapter(model: torch.nn.Module) -> BlockAdapter:
    return BlockAdapter(
        blocks=list(model.blocks),
        attention=[b.attn1 for b in model.blocks],
        streams_in=lambda g, a, k: [_first(a, k, "hidden_states", 0)],
        make_output=lambda g, s: s[0],
        streams_out=lambda g, out: [out],
    )


def two_stream_adapter(model: torch.nn.Module, blocks_attr: str = "transformer_blocks", attn_attr: str = "attn1") -> BlockAdapter:
    """Blocks that take (hidden, encoder) and return (hidden, encoder): CogVideoX, LTX-free."""
    blocks = list(getattr(model, blocks_attr))
    return BlockAdapter(
        blocks=blocks,
        attention=[getattr(b, attn_attr) for b in blocks],
        streams_in=lambda g, a, k: [_first(a, k, "hidden_states", 0), _first(a, k, "encoder_hidden_states", 1)],
        make_output=lambda g, s: (s[0], s[1]),
        streams_out=lambda g, out: [out[0], out[1]],
    )


class EagerReference:
    def __init__(self, model: torch.nn.Module, adapter: BlockAdapter, batch_order: tuple[str, str] = ("uncond", "cond")) -> None:
        self.model = model
        self.ad = adapter
        self.batch_order = batch_order
        self.last_out: dict[str, torch.Tensor] = {}
        self.delta: torch.Tensor | None = None
        self.residual: dict[tuple[str, int, int], list[torch.Tensor]] = {}
        self.attn: dict[tuple[str, int], Any] = {}
        self.computed_at: dict[int, set[str]] = {}

    # -- one call -------------------------------------------------------------------------
    @torch.no_grad()
    def call(self, step: int, branch: str, action: str, inputs: dict[str, Any], watch_ranges=(), watch_attn=()) -> torch.Tensor:
        kind, _, arg = action.partition(":")
        if kind == "step":
            return self.last_out[branch].clone()
        if kind == "cfg" and branch == "uncond":
            out = self.last_out["cond"] + self.delta
            self.last_out["uncond"] = out
            return out
        if kind == "cfg":  # batched: compute the cond half alone
            part = self.batch_order.index("cond")
            half = {k: (v.chunk(2)[part] if isinstance(v, torch.Tensor) and v.dim() > 0 and k != "image_rotary_emb" else v) for k, v in inputs.items()}
            cond = self.model(**half)[0]
            uncond = cond + self.delta
            out = torch.cat([uncond, cond] if part == 1 else [cond, uncond])
            self.last_out[branch] = out
            return out
        skip = tuple(int(x) for x in arg.split("-")) if kind == "block" else None
        reuse_attn = [int(x) for x in arg.split(",")] if kind == "attn" else []
        with self._hooks(branch, skip, reuse_attn, watch_ranges, watch_attn):
            out = self.model(**inputs)[0]
        self.last_out[branch] = out.clone()
        done = self.computed_at.setdefault(step, set())
        if branch == "uncond" and "cond" in done:
            self.delta = out - self.last_out["cond"]
        if branch == "batch":
            halves = out.chunk(2)
            part = self.batch_order.index("cond")
            self.delta = halves[1 - part] - halves[part]
        done.add(branch)
        return out

    # -- hooks ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooks(self, branch, skip, reuse_attn, watch_ranges, watch_attn) -> Iterator[None]:
        ad, handles, saved = self.ad, [], []
        range_inputs: dict[tuple[int, int], list[torch.Tensor]] = {}

        def replace(module, fn):
            saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
            module.forward = fn

        if skip is not None:
            a, b = skip
            res = self.residual[(branch, a, b)]
            entry = {}

            def first_forward(*args, **kwargs):
                entry["streams"] = ad.streams_in(a, args, kwargs)
                return ad.make_output(b - 1, [s + r for s, r in zip(entry["streams"], res)])

            replace(ad.blocks[a], first_forward)
            for g in range(a + 1, b):
                replace(ad.blocks[g], lambda *args, _g=g, **kwargs: ad.make_output(_g, ad.streams_in(_g, args, kwargs)))
        for g in reuse_attn:
            cached = self.attn[(branch, g)]
            replace(ad.attention[g], lambda *args, _c=cached, **kwargs: _c)
        for rng in watch_ranges:
            a, b = rng

            def pre(mod, args, kwargs, _r=rng, _a=a):
                range_inputs[_r] = [t.clone() for t in ad.streams_in(_a, args, kwargs)]

            def post(mod, args, kwargs, out, _r=rng, _b=b):
                if _r in range_inputs:
                    outs = ad.streams_out(_b - 1, out)
                    self.residual[(branch, *_r)] = [o - i for o, i in zip(outs, range_inputs[_r])]

            if skip is None or not (skip[0] <= a < skip[1] or skip[0] <= b - 1 < skip[1]):
                handles.append(ad.blocks[a].register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(ad.blocks[b - 1].register_forward_hook(post, with_kwargs=True))
        for g in watch_attn:
            if g in reuse_attn or (skip is not None and skip[0] <= g < skip[1]):
                continue

            def keep(mod, args, out, _g=g):
                self.attn[(branch, _g)] = tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

            handles.append(ad.attention[g].register_forward_hook(keep))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for module, had, fwd in reversed(saved):
                if had:
                    module.forward = fwd
                else:
                    del module.forward
