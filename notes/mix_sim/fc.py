import sys, time, warnings, copy, torch
warnings.filterwarnings("ignore"); torch.set_num_threads(1)
import mixcache_compile
from mixcache_compile.zoo import load_pipeline, default_call_kwargs
from mixcache_compile.eval.metrics import psnr
from mixcache_compile.policies.fastercache import FasterCachePolicy, FasterCacheConfig
which = sys.argv[1]
variants = eval(sys.argv[2])
samples = {"held": [("blue square moving down", 1000), ("green circle moving up", 1000)],
           "calib": [("red circle moving left", 7), ("yellow circle moving down", 7)],
           "tune": [("red circle moving left", 0), ("blue square moving down", 0)]}[which]
base = load_pipeline(); base.set_progress_bar_config(disable=True)
kw = default_call_kwargs(num_inference_steps=50, guidance_scale=5.0)
def gen(p, pr, s):
    with torch.no_grad():
        return p(prompt=pr, generator=torch.Generator().manual_seed(s), **kw).frames
refs = [gen(base, p, s) for p, s in samples]
pipe = copy.deepcopy(base)
session = mixcache_compile.enable(pipe, policy="fastercache", engine="eager")
for v in variants:
    pol = FasterCachePolicy(FasterCacheConfig(**v))
    if session._runner is not None: pol.needs(session._runner.model_info)
    session.policy = pol
    ps, fr = [], []
    for (p, s), r in zip(samples, refs):
        session.reset(); session._reset_counters()
        out = gen(pipe, p, s)
        ps.append(psnr(out, r)); fr.append(session.stats()["computed_fraction"])
    print(f"fc {which} {v}: psnr {sum(ps)/len(ps):.2f} ({' '.join(f'{x:.2f}' for x in ps)}) fraction {sum(fr)/len(fr):.3f}", flush=True)
