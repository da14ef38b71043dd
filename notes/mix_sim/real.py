import sys, time, warnings, copy, torch
warnings.filterwarnings("ignore"); torch.set_num_threads(1)
import mixcache_compile
from mixcache_compile.zoo import load_pipeline, default_call_kwargs
from mixcache_compile.eval.metrics import psnr
from mixcache_compile.policies.mixcache import MixCachePolicy, MixCacheConfig
name, which = sys.argv[1], sys.argv[2]
thresholds = [float(t) for t in sys.argv[3].split(",")]
extra = eval(sys.argv[4]) if len(sys.argv) > 4 else {}
samples = {"held": [("blue square moving down", 1000), ("green circle moving up", 1000)],
           "calib": [("red circle moving left", 7), ("yellow circle moving down", 7)]}[which]
base = load_pipeline(name=name); base.set_progress_bar_config(disable=True)
kw = default_call_kwargs(num_inference_steps=50, guidance_scale=5.0)
def gen(p, pr, s):
    with torch.no_grad():
        return p(prompt=pr, generator=torch.Generator().manual_seed(s), **kw).frames
refs = [gen(base, p, s) for p, s in samples]
pipe = copy.deepcopy(base)
session = mixcache_compile.enable(pipe, policy="mixcache", engine="eager", **extra)
print("calibration", session.policy.calibration_source)
for t in thresholds:
    old = session.policy
    pol = MixCachePolicy(MixCacheConfig(threshold=t, **extra)); pol.bind_model(base.transformer)
    pol.needs(session._runner.model_info) if session._runner is not None else None
    session.policy = pol
    ps, fr = [], []
    for (p, s), r in zip(samples, refs):
        session.reset(); session._reset_counters()
        out = gen(pipe, p, s)
        ps.append(psnr(out, r)); fr.append(session.stats()["computed_fraction"])
    acts = session.stats()["actions"]
    print(f"{name} {which} thr {t}: psnr {sum(ps)/len(ps):.2f} ({' '.join(f'{v:.2f}' for v in ps)}) fraction {sum(fr)/len(fr):.3f} {acts}", flush=True)
