"""Simulator: fixed computed-step schedules + extrapolation rules, plain PyTorch."""
import math, sys, time, warnings, json
import torch
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from mixcache_compile.zoo import load_pipeline, default_call_kwargs
from mixcache_compile.eval.metrics import psnr

STEPS = 50
def kw(): return default_call_kwargs(num_inference_steps=STEPS, guidance_scale=5.0)

class Sim:
    def __init__(self, name):
        self.pipe = load_pipeline(name=name); self.pipe.set_progress_bar_config(disable=True)
        self.model = self.pipe.transformer
        self.orig = self.model.forward
        self.mode = None
    def install(self, controller):
        model, orig = self.model, self.orig
        state = {"n": 0, "hist": {0: [], 1: []}, "computed": 0}
        def fwd(*args, **kwargs):
            n = state["n"]; state["n"] += 1
            step, br = n // 2, n % 2
            t = float(kwargs["timestep"].flatten()[0])
            h = state["hist"][br]
            if controller is None or controller.compute(step, br, t, h):
                out = orig(*args, **kwargs)
                o = out[0] if isinstance(out, tuple) else out.sample
                h.append((step, t, o.detach().clone()))
                del h[:-4]
                state["computed"] += 1
                return out
            o = controller.reuse(step, br, t, h)
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
            return (o,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=o)
        model.forward = fwd
        return state
    def run(self, prompt, seed, controller=None, record=False):
        st = self.install(controller)
        rec = {"temb": [], "t": []}
        hk = None
        if record:
            from mixcache_compile.policies.calibration import find_blocks
            b0 = find_blocks(self.model)[0]
            hk = b0.register_forward_pre_hook(lambda m, a, k: rec["temb"].append((k["temb"] if "temb" in k else a[2]).detach().clone()), with_kwargs=True)
        with torch.no_grad():
            out = self.pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **kw()).frames
        if hk: hk.remove()
        self.model.forward = self.orig
        return out, st, rec

def rel(a, b): return float((a - b).abs().mean() / (b.abs().mean() + 1e-12))

class Schedule:
    """compute on steps in S; reuse rule rule(step, t, hist)"""
    def __init__(self, S, rule):
        self.S, self.rule = set(S), rule
    def compute(self, step, br, t, h): return step in self.S
    def reuse(self, step, br, t, h): return self.rule(step, t, h)

def rule_plain(step, t, h): return h[-1][2].clone()
def make_rule(kind="idx", d=0.5, order=1, cap=None):
    def rule(step, t, h):
        if len(h) < 2: return h[-1][2].clone()
        (i1, t1, e1), (i2, t2, e2) = h[-2], h[-1]
        if kind == "idx":
            r, g = step - i2, i2 - i1
        else:
            r, g = t - t2, t2 - t1
        w = r / g
        reach = step - i2
        w = w / (1 + d * max(reach - 1, 0))
        if cap is not None: w = min(w, cap)
        out = e2 + w * (e2 - e1)
        if order == 2 and len(h) >= 3:
            i0, t0, e0 = h[-3]
            # second-order Newton term, damped
            if kind == "idx": x0, x1, x2, x = i0, i1, i2, step
            else: x0, x1, x2, x = t0, t1, t2, t
            d1 = (e2 - e1) / (x2 - x1); d0 = (e1 - e0) / (x1 - x0)
            dd = (d1 - d0) / (x2 - x0)
            out = out + dd * (x - x2) * (x - x1) / (1 + d * max(reach - 1, 0))
        return out
    return rule

def teacache_schedule(x, thr, warm=2, final=1):
    S, acc = [], 0.0
    n = len(x)
    for i in range(n):
        if i < warm or i >= n - final or i == 0:
            S.append(i); acc = 0.0; continue
        acc += x[i]
        if acc > thr:
            S.append(i); acc = 0.0
    return S

def make_rule_x(X, d=0.25, pw=1.0):
    """linear in cumulative indicator X[step] (X[0]=0)"""
    def rule(step, t, h):
        if len(h) < 2: return h[-1][2].clone()
        (i1, t1, e1), (i2, t2, e2) = h[-2], h[-1]
        w = ((X[step] - X[i2]) / (X[i2] - X[i1])) ** pw if X[i2] > X[i1] else 0.0
        w = w / (1 + d * max(step - i2 - 1, 0))
        return e2 + w * (e2 - e1)
    return rule
