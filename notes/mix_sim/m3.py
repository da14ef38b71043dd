import sys; sys.path.insert(0, "/tmp")
from msim import *
exec(open("/tmp/m2.py").read().split("rules =")[0].split("sim = Sim(name)",1)[1].replace("name = sys.argv[1]",""), globals()) if False else None
name = sys.argv[1]
sim = Sim(name)
samples = [("red circle moving left", 7), ("yellow circle moving down", 7)]
d = torch.load(f"/tmp/msim_{name}.pt"); x, refs = d["x"], d["refs"]
def ev(S, rule):
    ps = []
    for (p, s), r in zip(samples, refs):
        out, st, _ = sim.run(p, s, Schedule(S, rule))
        ps.append(psnr(out, r))
    return sum(ps)/len(ps)
def quant(n, p, warm=2, final=1):
    S = set(range(warm)) | set(range(50 - final, 50))
    m = n - len(S)
    xs = [0.0] * warm + [x[i] ** p for i in range(warm, 50 - final)]
    c = []; acc = 0
    for v in xs: acc += v; c.append(acc)
    C = acc
    for k in range(1, m + 1):
        tgt = k * C / (m + 1)
        i = next(i for i in range(warm, 50 - final) if c[i] >= tgt - 1e-12)
        while i in S: i += 1
        S.add(i)
    return sorted(S)
rules = {f"t d{dd}": make_rule("t", dd) for dd in (0.15, 0.25, 0.35)}


for n in [int(a) for a in sys.argv[2].split(",")]:
    for p in (0.75, 1.0, 1.25):
      for warm in (1,):
        S = quant(n, p, warm)
        res = {k: round(ev(S, r), 2) for k, r in rules.items()}
        print(n, p, warm, S, res, flush=True)
