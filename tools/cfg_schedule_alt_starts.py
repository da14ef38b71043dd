"""Deep, cost 0.12: 5F+2H from every removal of one full step of the best 6F schedule, 2 half steps inserted greedily (a second start for the mixed search)."""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, "tools")
from cfg_schedule_sim import Simulator
from cfg_schedule_search import Search, CALIBRATION
sim = Simulator("deep", CALIBRATION, damping=0.5)
s = Search(sim, "fresh", log=False)
base = (0, 23, 32, 41, 45, 48)
for p in base[1:]:
    f, h = tuple(x for x in base if x != p), ()
    f, h = s.insert(f, h, "H"); f, h = s.insert(f, h, "H")
    print(p, "removed ->", f, h, round(s.score(f, h), 2), flush=True)
