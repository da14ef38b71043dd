"""Backend benchmark: the mixcache backend (engine ``inductor``) against plain
``torch.compile(backend="inductor", fullgraph=True)``, in one process, interleaved, medians.

Two models:
  * ``--model shipped``: the trained tiny Wan of ``mixcache_compile.zoo`` (4 blocks, 64 tokens:
    launch/Python-bound, where per-call overhead is the whole game);
  * ``--model bench``: a 12-block random-weight Wan (dim 128, 1152 tokens: compute-bound).
For each policy: a separate-CFG sampling loop (guidance 5, Euler) through the policy's compiled
model and through plain inductor, interleaved, each on ``--copies`` model copies (Note [model
copies]); speedup = plain / policy (median over rounds of the in-round ratio of mean
generation times over the copies, Note [paired rounds]), share of ideal =
speedup x computed fraction (1.0: every skipped FLOP paid off in full). Also: the spread of the
plain copies' medians (the noise floor), compile time of policy ``none`` vs plain (first
call, inductor caches off), the per-call time ratio of policy ``none``, the stage count after
fusion, and a recompile check (Dynamo frames compiled and engine compiles during the timed
runs must not grow).
Usage: ``python tools/bench_backend.py --model shipped --steps 50`` (see README).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixcache_compile import CacheSession  # noqa: E402
from mixcache_compile.eval.timing import interleaved_times, paired_ratio, pooled_median, timed  # noqa: E402

POLICIES = {
    "none": ("none", {}),
    "static_every_2": ("static", {"every": 2}),
    "teacache_0.1": ("teacache", {"threshold": 0.1}),
    "fbcache_0.1": ("fbcache", {"threshold": 0.1}),
}


def bench_model(layers: int):
    """The 12-block bench model (kept for tools/bench_memory.py): model, latents, cond, uncond."""
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


def shipped_model():
    """The shipped trained model with inputs of its training shape (random text embeddings)."""
    from mixcache_compile.zoo import NUM_FRAMES, TEXT_LEN, load_config, load_transformer

    model = load_transformer()
    cfg, video = load_config()["transformer"], load_config()["video"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg["in_channels"], NUM_FRAMES, video["height"], video["width"], generator=g)
    cond = torch.randn(1, TEXT_LEN, cfg["text_dim"], generator=g)
    uncond = torch.randn(1, TEXT_LEN, cfg["text_dim"], generator=g)
    return model, latents, cond, uncond


def generation(fn, latents, cond, uncond, steps: int, session: CacheSession | None, guidance: float = 5.0,
               per_call: dict[str, list[float]] | None = None):
    """A separate-CFG sampling loop (Euler on a fixed schedule), as WanPipeline runs it.
    ``per_call``: if given, each call's wall time is appended under the action it ran."""
    x = latents.clone()
    for i in range(steps):
        t = torch.tensor([1000.0 * (1 - i / steps)])
        outs = []
        for name, emb in (("cond", cond), ("uncond", uncond)):
            start, cpu = time.perf_counter(), time.process_time()
            if session is not None:
                with session.context(name, step_index=i, num_inference_steps=steps):
                    outs.append(fn(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0])
            else:
                outs.append(fn(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0])
            if per_call is not None:
                action = session.trace[-1].action.split("(")[0] if session is not None else "plain"
                per_call.setdefault(action, []).append((time.perf_counter() - start, time.process_time() - cpu))
        eps = outs[1] + guidance * (outs[0] - outs[1])
        x = x - eps / steps
    return x


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {m: statistics.median(v) for m, v in times.items()}


def _frames_compiled() -> int:
    return sum(torch._dynamo.utils.counters["frames"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["shipped", "bench"], default="shipped")
    parser.add_argument("--layers", type=int, default=12, help="blocks of the bench model")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=4, help="model copies per method (Note [model copies])")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {', '.join(POLICIES)}")
    parser.add_argument("--out", default=None, help="JSON path (default out/bench_backend_<model>.json)")
    parser.add_argument("--guards", choices=["per_generation", "every_call"], default="per_generation",
                        help="mixcache's guards option (Note [guards once per generation]); plain always checks every call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to other load)")
    args = parser.parse_args()
    if args.copies < 1 or args.repeats < 1:
        raise SystemExit("--copies and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    # Every copy's first call goes through the model class's shared forward code (diffusers'
    # ``wrapper``), and each torch.compile brings its own backend callable, so each copy adds
    # a Dynamo cache entry there (BACKEND_MATCH, seen with 4 copies of each of 3 methods);
    # past ``recompile_limit`` (8) a fullgraph compile raises. Plain torch.compile copies add
    # their entries the same way: a benchmark with many copies needs room for them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * args.copies * (len(POLICIES) + 1))
    model, latents, cond, uncond = shipped_model() if args.model == "shipped" else bench_model(args.layers)
    call = dict(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=cond, return_dict=False)
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; valid: {', '.join(POLICIES)}")
    copies = range(args.copies)
    results: dict = {"model": args.model, "blocks": len(model.blocks), "steps": args.steps, "repeats": args.repeats,
                     "copies": args.copies, "threads": torch.get_num_threads(), "guards": args.guards, "load_avg_start": os.getloadavg()[0],
                     "policies": {}}
    with torch.no_grad():
        torch._dynamo.reset()
        fns: dict = {}
        # Own copies: the mixcache compiles give ``model`` an entry frame with a bypass
        # detector (runtime/entry.py), which plain calls must not pay for.
        plains = [torch.compile(copy.deepcopy(model), backend="inductor", fullgraph=True) for _ in copies]
        results["compile_s_plain"], _ = timed(lambda: plains[0](**call))
        for k in copies:
            plains[k](**call)
            fns[f"plain#{k}"] = lambda p=plains[k]: generation(p, latents, cond, uncond, args.steps, None)
        sessions: dict[str, list[CacheSession]] = {}
        compiled_of: dict[str, list] = {}
        for name in names:
            policy, options = POLICIES[name]
            sessions[name], compiled_of[name] = [], []
            for k in copies:
                session = CacheSession(policy, **options)
                # One model copy per session (as enable() has it: one session, one model, one entry frame).
                compiled = torch.compile(copy.deepcopy(model), backend="mixcache", fullgraph=True,
                                         options={"session": session, "engine": "inductor", "guards": args.guards})
                if name == "none" and k == 0:
                    results["compile_s_none"], _ = timed(lambda c=compiled: c(**call))
                sessions[name].append(session)
                compiled_of[name].append(compiled)
                fns[f"{name}#{k}"] = (lambda c=compiled, s=session: generation(c, latents, cond, uncond, args.steps, s))
                fns[f"{name}#{k}"]()  # compile this copy's stages outside the timed runs
            print(f"compiled {name}: {sessions[name][0].stats()['stages']} stage(s) x {args.copies} copies", flush=True)
        for session in (s for group in sessions.values() for s in group):
            session.reset_stats()
        frames = _frames_compiled()
        gens = interleaved_times(fns, repeats=args.repeats, warmup=1)
        if "none" in names:
            # Per call, one fixed input (every call reads as a new generation to the session).
            call_fns = {f"{m}#{k}": (lambda c=c: c(**call))
                        for m, group in (("plain", plains), ("none", compiled_of["none"])) for k, c in enumerate(group)}
            calls = interleaved_times(call_fns, repeats=args.repeats * 20, warmup=3)
            results["call_ratio_none"] = paired_ratio(calls, "plain", "none", args.copies)
            results["call_ms_plain"] = {m: 1000 * v for m, v in pooled_median(calls, "plain", args.copies).items()}
        # One more generation each on copy 0, timing every call by the action it ran (outside
        # the timed runs, so the bookkeeping costs them nothing): what a computed and a skipped call cost.
        per_call: dict[str, dict[str, list[tuple[float, float]]]] = {"plain": {}}
        generation(plains[0], latents, cond, uncond, args.steps, None, per_call=per_call["plain"])
        for name in names:
            per_call[name] = {}
            generation(compiled_of[name][0], latents, cond, uncond, args.steps, sessions[name][0], per_call=per_call[name])
        results["call_ms_by_action"] = {
            name: {a: {m: round(1000 * statistics.median(t[i] for t in v), 3) for i, m in enumerate(("wall", "cpu"))}
                   for a, v in by_action.items()}
            for name, by_action in per_call.items()
        }
        results["recompiles_during_timing"] = _frames_compiled() - frames
        results["load_avg_end"] = os.getloadavg()[0]
        plain_gen = pooled_median(gens, "plain", args.copies)
        results["gen_s_plain"] = plain_gen
        by_copy = results["gen_s_by_copy"] = {key: medians(t) for key, t in gens.items()}
        plain_copy_medians = [by_copy[f"plain#{k}"] for k in copies]
        results["plain_copy_spread"] = {m: max(c[m] for c in plain_copy_medians) / min(c[m] for c in plain_copy_medians)
                                        for m in ("wall", "cpu")}
        if args.copies >= 2:
            # The floor a ratio can resolve: the plain copies split in two halves, compared
            # the way every method is compared with plain (Note [paired rounds]).
            half = args.copies // 2
            halves = {f"a#{k}": gens[f"plain#{k}"] for k in range(half)} | {f"b#{k}": gens[f"plain#{half + k}"] for k in range(half)}
            results["plain_halves_ratio"] = paired_ratio(halves, "a", "b", half)
        for name, group in sessions.items():
            stats = [s.stats() for s in group]
            fraction = stats[0]["computed_fraction"]
            if any(s["computed_fraction"] != fraction for s in stats):
                raise SystemExit(f"{name}: copies of one model made different decisions: "
                                 f"{[s['computed_fraction'] for s in stats]}")
            speedup = paired_ratio(gens, "plain", name, args.copies)
            results["policies"][name] = {
                "gen_s": pooled_median(gens, name, args.copies), "speedup": speedup, "computed_fraction": fraction,
                "share_of_ideal": {m: v * fraction for m, v in speedup.items()}, "stages": stats[0]["stages"],
                "compiles": group[0]._runner.engine.compiles, "generations": stats[0]["generations"],
            }
    out = Path(args.out or f"out/bench_backend_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [
        f"Model `{r['model']}` ({r['blocks']} blocks); {r['steps']} steps x 2 CFG calls (guidance 5); {r['threads']} thread; "
        f"{r['repeats']} rounds of interleaved generations (random order) x {r.get('copies', 1)} model copies per method, "
        f"speedup = median over rounds of the in-round ratio; load average {r['load_avg_start']:.1f} -> {r['load_avg_end']:.1f}.",
        "",
        "| policy | stages | computed fraction | speedup vs plain (wall) | share of ideal (wall) | speedup (CPU time) | share of ideal (CPU time) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in r["policies"].items():
        sp, sh = p["speedup"], p["share_of_ideal"]
        lines.append(f"| `{name}` | {p['stages']} | {p['computed_fraction']:.3f} | {sp['wall']:.2f}x | {sh['wall']:.0%} | "
                     f"{sp['cpu']:.2f}x | {sh['cpu']:.0%} |")
    lines.append("")
    if "plain_copy_spread" in r:
        lines.append(f"Noise floor: the plain copies' medians span {r['plain_copy_spread']['wall']:.2f}x (wall), "
                     f"{r['plain_copy_spread']['cpu']:.2f}x (CPU time), slowest / fastest.")
    if "plain_halves_ratio" in r:
        lines.append(f"Plain against plain (copies split in halves, same estimator): {r['plain_halves_ratio']['wall']:.3f}x wall, "
                     f"{r['plain_halves_ratio']['cpu']:.3f}x CPU time.")
    if "gen_s_by_copy" in r:
        lines.append("Median generation by copy (s, wall): " + ", ".join(f"{k} {t['wall']:.3f}" for k, t in r["gen_s_by_copy"].items()) + ".")
    if "call_ratio_none" in r:
        ratio, ms = r["call_ratio_none"], r["call_ms_plain"]
        lines.append(f"Per call, policy `none` / plain: {ratio['wall']:.3f}x wall, {ratio['cpu']:.3f}x CPU time "
                     f"(plain call {ms['wall']:.2f} ms wall, {ms['cpu']:.2f} ms CPU).")
    if "compile_s_none" in r:
        lines.append(f"Compile, policy `none` / plain: {r['compile_s_none']:.1f} s / {r['compile_s_plain']:.1f} s.")
    for name, by_action in r.get("call_ms_by_action", {}).items():
        lines.append(f"Median call, {name}: " + ", ".join(f"{a} {t['wall']:.2f} ms wall / {t['cpu']:.2f} ms CPU"
                                                          for a, t in by_action.items()) + ".")
    lines.append(f"Dynamo frames compiled during the timed runs: {r['recompiles_during_timing']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
