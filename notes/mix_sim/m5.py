import sys; sys.path.insert(0, "/tmp")
exec(open("/tmp/m3.py").read().split("rules = ")[0])
rules = {"plain": rule_plain, "t d0": make_rule("t", 0.0), "t d0.25": make_rule("t", 0.25), "t d0.5": make_rule("t", 0.5), "t d1": make_rule("t", 1.0)}
for n in [int(a) for a in sys.argv[2].split(",")]:
    for p in (1.0, 0.75):
        S = quant(n, p, 1)
        res = {k: round(ev(S, r), 2) for k, r in rules.items()}
        print(n, p, S, res, flush=True)
