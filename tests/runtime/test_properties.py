"""Property tests: random small DiT configs and random static schedules.

For random WanTransformer3DModel configs (depth, heads, dims, frames, patch sizes) policy
``none`` equals eager, and a random static schedule over the actions equals the independent
eager reference of that schedule. Each example traces a new model, so examples are few.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixcache_compile import CacheSession
from tests.eager_reference import EagerReference, wan_adapter

TOL = 1e-5


@st.composite
def wan_configs(draw):
    layers = draw(st.integers(2, 4))
    heads = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([8, 12, 16]))
    patch = draw(st.sampled_from([(1, 1, 1), (1, 2, 2)]))
    frames = draw(st.integers(1, 3))
    size = draw(st.sampled_from([4, 8])) if patch[1] == 2 else draw(st.sampled_from([2, 4]))
    return {
        "config": dict(patch_size=patch, num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                       out_channels=4, text_dim=16, freq_dim=32, ffn_dim=draw(st.sampled_from([16, 32])),
                       num_layers=layers, cross_attn_norm=draw(st.booleans()), rope_max_seq_len=32),
        "shape": (1, 4, frames, size, size),
        "seed": draw(st.integers(0, 1000)),
    }


def _model(cfg):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(cfg["seed"])
    return WanTransformer3DModel(**cfg["config"]).eval()


def _inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(cfg["shape"], generator=g), "encoder_hidden_states": torch.randn(1, 5, 16, generator=g)}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=wan_configs())
def test_random_configs_none_equals_eager(cfg):
    torch._dynamo.reset()
    model = _model(cfg)
    session = CacheSession("none")
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
    with torch.no_grad():
        for step in range(2):
            kwargs = {**_inputs(cfg, step), "timestep": torch.tensor([800.0 - 300 * step]), "return_dict": False}
            assert (compiled(**kwargs)[0] - model(**kwargs)[0]).abs().max().item() <= TOL
    assert session._runner is not None


@st.composite
def schedules(draw, layers: int, steps: int):
    schedule = {}
    for step in range(1, steps):
        for branch in ("cond", "uncond"):
            kinds = ["full", "step", "attn"] + (["cfg"] if branch == "uncond" else [])
            kinds += ["block"]
            kind = draw(st.sampled_from(kinds))
            if kind == "block":
                a = draw(st.integers(0, layers - 1))
                b = draw(st.integers(a + 1, layers))
                kind = f"block:{a}-{b}"
            elif kind == "attn":
                blocks = draw(st.lists(st.integers(0, layers - 1), min_size=1, max_size=layers, unique=True))
                kind = "attn:" + ",".join(map(str, sorted(blocks)))
            schedule[(step, branch)] = kind
    return schedule


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cfg=wan_configs())
def test_random_static_schedule_equals_reference(data, cfg):
    torch._dynamo.reset()
    steps = 5
    layers = cfg["config"]["num_layers"]
    schedule = data.draw(schedules(layers, steps))
    model = _model(cfg)
    session = CacheSession("static", schedule=schedule)
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
    needs = session.policy.needs(None)
    ref = EagerReference(model, wan_adapter(model))
    cond, uncond = _inputs(cfg, 1)["encoder_hidden_states"], _inputs(cfg, 2)["encoder_hidden_states"]
    with torch.no_grad():
        for step in range(steps):
            latent = _inputs(cfg, 10 + step)["hidden_states"]
            for branch, emb in (("cond", cond), ("uncond", uncond)):
                kwargs = {"hidden_states": latent, "encoder_hidden_states": emb,
                          "timestep": torch.tensor([900.0 - 100 * step]), "return_dict": False}
                with session.context(branch, step_index=step):
                    got = compiled(**kwargs)[0]
                entry = session.trace[-1]
                # The reference runs what the runtime ran: a fallback (missing cache) is FULL.
                ran = "full" if entry.fallback else schedule.get((step, branch), "full")
                want = ref.call(step, branch, ran, kwargs, sorted(needs.ranges), sorted(needs.attn_blocks))
                assert (got - want).abs().max().item() <= TOL, (step, branch, ran, entry)
                if entry.fallback:
                    assert entry.action == "FULL"
