import sys; sys.path.insert(0, "/tmp")
from msim import *
name = sys.argv[1]
sim = Sim(name)
samples = [("red circle moving left", 7), ("yellow circle moving down", 7)]
refs = []
for p, s in samples:
    t0 = time.time()
    out, st, rec = sim.run(p, s, None, record=True)
    refs.append(out)
    print("ref", time.time() - t0)
temb = rec["temb"][::2]
x = [math.inf] + [rel(temb[i], temb[i-1]) for i in range(1, len(temb))]
print("x", [round(v, 4) for v in x])
torch.save({"x": x, "refs": refs}, f"/tmp/msim_{name}.pt")
def ev(S, rule):
    ps = []
    for (p, s), r in zip(samples, refs):
        out, st, _ = sim.run(p, s, Schedule(S, rule))
        ps.append(psnr(out, r))
    return sum(ps)/len(ps)
for thr in (0.08, 0.12, 0.16, 0.24):
    S = teacache_schedule(x, thr)
    res = {"plain": ev(S, rule_plain)}
    for d in (0.0, 0.5, 1.0):
        res[f"idx d{d}"] = ev(S, make_rule("idx", d))
        res[f"t d{d}"] = ev(S, make_rule("t", d))
    res["o2 t d0.5"] = ev(S, make_rule("t", 0.5, 2))
    print(thr, len(S), {k: round(v, 2) for k, v in res.items()}, flush=True)
