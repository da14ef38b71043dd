"""Backend benchmark: the mixcache backend against plain ``torch.compile(backend="inductor")``.

On a bench-size random-weight ``WanTransformer3DModel`` (speed does not depend on trained
weights), in one process, interleaved, median of repetitions:
  1. per-call overhead of policy ``none`` vs plain inductor (ratio of median call times);
  2. compile time (first call, inductor caches off) vs plain inductor's;
  3. static schedules that skip a known FLOP fraction: achieved speedup over policy ``none``
     vs the ideal ``1 / computed_fraction``.
Writes JSON and prints a Markdown table. Usage: ``python tools/bench_backend.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixcache_compile import CacheSession  # noqa: E402
from mixcache_compile.eval.timing import interleaved_medians, timed  # noqa: E402


def bench_model(layers: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=512, num_layers=layers, cross_attn_norm=True, rope_max_seq_len=64,
    ).eval()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 4, 24, 24, generator=g)
    cond, uncond = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    return model, latents, cond, uncond


def generation(fn, latents, cond, uncond, steps: int, session: CacheSession | None):
    """A separate-CFG sampling loop (Euler on a fixed schedule), as WanPipeline runs it."""
    x = latents.clone()
    for i in range(steps):
        t = torch.tensor([1000.0 * (1 - i / steps)])
        outs = []
        for name, emb in (("cond", cond), ("uncond", uncond)):
            if session is not None:
                with session.context(name, step_index=i, num_inference_steps=steps):
                    outs.append(fn(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0])
            else:
                outs.append(fn(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0])
        eps = outs[1] + 5.0 * (outs[0] - outs[1])
        x = x - eps / steps
    return x


def _stages_only(compiled, session: CacheSession, call: dict):
    """The planned stages run back to back with no session, no Dynamo guards: separates the
    cost of splitting the graph from the cost of the runtime around it."""
    from mixcache_compile.policies.protocol import FULL

    compiled(**call)
    runner = session._runner
    captured: dict = {}
    original = runner.run_graph
    runner.run_graph = lambda args, *rest, **kw: (captured.setdefault("args", list(args)), original(args, *rest, **kw))[1]
    compiled(**call)
    runner.run_graph = original
    args = captured["args"]
    sig = runner.intern(runner.inputs.user_signature(args))
    return lambda: runner.run_graph(args, sig, FULL, lambda rng: [], {}, set(), set())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer layers/steps/repeats (smoke run)")
    parser.add_argument("--out", default="out/bench_backend.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: least sensitive to other load on the machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.layers, args.steps, args.repeats = 4, 6, 2
    model, latents, cond, uncond = bench_model(args.layers)
    call = dict(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=cond, return_dict=False)
    results: dict[str, float | int | str] = {"layers": args.layers, "steps": args.steps, "repeats": args.repeats,
                                             "threads": torch.get_num_threads()}
    with torch.no_grad():
        torch._dynamo.reset()
        plain = torch.compile(model, backend="inductor", fullgraph=True)
        results["compile_s_inductor"], _ = timed(lambda: plain(**call))
        none_session = CacheSession("none")
        ours = torch.compile(model, backend="mixcache", fullgraph=True, options={"session": none_session, "engine": "inductor"})
        results["compile_s_mixcache"], _ = timed(lambda: ours(**call))
        print(f"compile: inductor {results['compile_s_inductor']:.1f}s, mixcache {results['compile_s_mixcache']:.1f}s", flush=True)

        stages_only = _stages_only(ours, none_session, call)
        calls = interleaved_medians(
            {"inductor": lambda: plain(**call), "mixcache_none": lambda: ours(**call), "stages_only": stages_only},
            repeats=args.repeats * 40, warmup=3,
        )
        results["call_s_inductor"], results["call_s_mixcache_none"] = calls["inductor"], calls["mixcache_none"]
        results["call_s_stages_only"] = calls["stages_only"]
        results["overhead_ratio"] = calls["mixcache_none"] / calls["inductor"]
        results["split_ratio"] = calls["stages_only"] / calls["inductor"]
        results["runtime_ms_per_call"] = 1000 * (calls["mixcache_none"] - calls["stages_only"])

        schedules = {
            "step_every_2": CacheSession("static", every=2, warmup=2),
            "block_every_2": CacheSession("static", schedule={i: f"block:2-{args.layers - 1}" for i in range(3, args.steps - 1, 2)}),
            "cfg_every_2": CacheSession("static", schedule={(i, "uncond"): "cfg" for i in range(3, args.steps - 1, 2)}),
        }
        fns = {"none": lambda: generation(ours, latents, cond, uncond, args.steps, none_session)}
        for name, session in schedules.items():
            compiled = torch.compile(model, backend="mixcache", fullgraph=True, options={"session": session, "engine": "inductor"})
            fns[name] = (lambda c=compiled, s=session: generation(c, latents, cond, uncond, args.steps, s))
            fns[name]()  # compile this policy's variants outside the timed runs
        for session in [none_session, *schedules.values()]:
            session.reset_stats()
        gens = interleaved_medians(fns, repeats=args.repeats, warmup=1)
        results.update({f"gen_s_{k}": v for k, v in gens.items()})
        print({k: round(v, 3) for k, v in gens.items()}, flush=True)
        for name, session in schedules.items():
            fraction = session.stats()["computed_fraction"]
            speedup = gens["none"] / gens[name]
            results[f"{name}_computed_fraction"] = fraction
            results[f"{name}_speedup"] = speedup
            results[f"{name}_of_ideal"] = speedup * fraction
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [
        f"Bench model: WanTransformer3DModel, {r['layers']} blocks, dim 128, 1152 tokens; {r['steps']} steps x 2 CFG calls; "
        f"{r['threads']} threads; medians of interleaved repetitions.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| per-call time, policy `none` / plain inductor | {r['overhead_ratio']:.3f} |",
        f"| per-call time, planned stages alone (no runtime) / plain inductor | {r['split_ratio']:.3f} |",
        f"| runtime cost per call (policy `none` minus stages alone) | {r['runtime_ms_per_call']:.2f} ms of "
        f"{1000 * r['call_s_inductor']:.0f} ms |",
        f"| compile time, mixcache / plain inductor | {r['compile_s_mixcache'] / r['compile_s_inductor']:.2f} "
        f"({r['compile_s_mixcache']:.0f} s vs {r['compile_s_inductor']:.0f} s) |",
    ]
    for name in ("step_every_2", "block_every_2", "cfg_every_2"):
        lines.append(
            f"| static `{name}`: computed fraction / speedup vs `none` / share of ideal 1/fraction | "
            f"{r[f'{name}_computed_fraction']:.3f} / {r[f'{name}_speedup']:.2f}x / {r[f'{name}_of_ideal']:.1%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
