import sys; sys.path.insert(0, "/tmp")
exec(open("/tmp/m3.py").read().split("rules = ")[0])
held = [("blue square moving down", 1000), ("green circle moving up", 1000)]
X = [0.0]
for i in range(1, 50): X.append(X[-1] + x[i])
sched = {"p1w1": lambda n: quant(n, 1.0, 1), "p1w2": lambda n: quant(n, 1.0, 2)}
rules = {"t d0.25": make_rule("t", 0.25), "x d0.25": make_rule_x(X, 0.25), "x d0": make_rule_x(X, 0.0), "x d0.5": make_rule_x(X, 0.5)}
mode = sys.argv[3] if len(sys.argv) > 3 else "calib"
if mode == "held":
    samples[:] = held
    refs = [sim.run(p, s)[0] for p, s in held]
for n in [int(a) for a in sys.argv[2].split(",")]:
    for sn, sf in sched.items():
        S = sf(n)
        res = {k: round(ev(S, r), 2) for k, r in rules.items()}
        print(mode, n, sn, S, res, flush=True)
