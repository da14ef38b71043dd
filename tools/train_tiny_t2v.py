"""Train the tiny text-to-video WanTransformer3DModel shipped in mixcache_compile/zoo/weights.

Flow matching in pixel space with diffusers' convention:
    x_t = (1 - sigma) * x0 + sigma * noise,  target = noise - x0,  timestep = sigma * 1000.
The text encoder is trained jointly; 12% of prompts are replaced by "" so that the empty
prompt learns the unconditional branch used by classifier-free guidance.

    python tools/train_tiny_t2v.py                 # the shipped "tiny" run: 4400 steps, ~25-40 min
    python tools/train_tiny_t2v.py --preset deep   # the shipped "deep" run (grown from tiny)

The deep preset (8 blocks, 128 tokens) starts from the trained tiny weights, grown so that the
grown model computes what the tiny one did (`grow_from_tiny`), then trains on the same data.

Reproducible from --seed (data, init and timestep draws all come from seeded generators)
as long as the run is not cut short by --minutes; the number of steps run is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from mixcache_compile.zoo import spec  # noqa: E402
from mixcache_compile.zoo.data import sample_batch  # noqa: E402
from mixcache_compile.zoo.text import TinyTextEncoder, WordTokenizer  # noqa: E402

ZOO = REPO / "mixcache_compile" / "zoo"


# Per-preset defaults; flags given on the command line win.
PRESETS: dict[str, dict] = {
    "tiny": {"config": spec.TRANSFORMER_CONFIG, "steps": 4400, "lr": 1e-3, "warmup": 200,
             "minutes": 58.0, "out": ZOO / "weights", "curve": ZOO / "loss_curve.png", "grow": False},
    "deep": {"config": spec.DEEP_TRANSFORMER_CONFIG, "steps": 3000, "lr": 5e-4, "warmup": 100,
             "minutes": 105.0, "out": ZOO / "weights" / "deep", "curve": ZOO / "deep_loss_curve.png",
             "grow": True},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (sets the LR schedule)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap; stops early and saves")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--prompt-dropout", type=float, default=0.12)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core free)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--curve", type=Path, default=None)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=200)
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


@torch.no_grad()
def grow_from_tiny(deep: WanTransformer3DModel, tiny_state: dict[str, torch.Tensor], tiny_config: dict) -> None:
    """Initialise the deep model so that it computes (nearly) what the trained tiny one did.

    - Block i of the tiny model becomes blocks 2i and 2i+1. The second copy's output
      projections (self-attention, cross-attention, FFN) are zeroed, so it starts as the
      identity on the residual stream and still receives gradients (as adaLN-Zero does).
    - The patch embedding's temporal kernel (2 frames) is summed into one frame, and the output
      projection's two temporal sub-patches are averaged: on slowly moving clips a token of one
      frame then embeds and predicts as the pair did.
    - Everything else (time/text embedders, norms, scale-shift tables) is copied as is.
    """
    depth_ratio = deep.config.num_layers // tiny_config["num_layers"]
    target = deep.state_dict()
    pt_old = tiny_config["patch_size"][0]
    pt_new = deep.config.patch_size[0]
    for key, value in tiny_state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for copy in range(depth_ratio):
                new_key = f"blocks.{int(index) * depth_ratio + copy}.{rest}"
                zero = copy > 0 and (rest.startswith(("attn1.to_out.", "attn2.to_out.", "ffn.net.2.")))
                target[new_key].copy_(torch.zeros_like(value) if zero else value)
        elif key == "patch_embedding.weight" and pt_old != pt_new:
            target[key].copy_(value.sum(dim=2, keepdim=True))
        elif key.startswith("proj_out.") and pt_old != pt_new:
            # rows are ordered (p_t, p_h, p_w, channels); average the temporal sub-patches
            rows = value.reshape(pt_old, -1, *value.shape[1:])
            target[key].copy_(rows.mean(dim=0))
        else:
            target[key].copy_(value)
    deep.load_state_dict(target, strict=True)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def sample_sigmas(n: int, gen: torch.Generator, shift: float) -> torch.Tensor:
    """Uniform sigmas pushed through the sampler's shift, so training sees noise levels as often
    as a shift-`shift` FlowMatchEulerDiscreteScheduler visits them. (A logit-normal draw starves the
    ends: layout is decided at sigma > 0.9 and crisp edges at sigma < 0.1.)"""
    u = torch.rand(n, generator=gen)
    return (shift * u / (1.0 + (shift - 1.0) * u)).clamp(1e-3, 1.0)


class Ema:
    """Exponential moving average of parameters; sampling from it is smoother than the raw
    weights of a short, high-learning-rate run."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.pairs = [(p, p.detach().clone()) for m in modules for p in m.parameters()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short memory while weights move fast
        for p, avg in self.pairs:
            avg.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to undo)."""
        for p, avg in self.pairs:
            tmp = p.detach().clone()
            p.copy_(avg)
            avg.copy_(tmp)


def save(out: Path, transformer: WanTransformer3DModel, encoder: TinyTextEncoder, facts: dict,
         transformer_config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().contiguous() for k, v in transformer.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(out / "tiny_t2v.safetensors"))
    config = {
        "transformer": dict(transformer_config),
        "text_encoder": dict(encoder.config),
        "vocab": list(spec.VOCAB),
        "video": {"height": spec.HEIGHT, "width": spec.WIDTH, "num_frames": spec.NUM_FRAMES},
        "text_len": spec.TEXT_LEN,
        "scheduler": {
            "class": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": spec.SCHEDULER_SHIFT,
            "note": f"training drew sigma uniformly through shift {spec.TRAIN_SIGMA_SHIFT}; "
            f"shift {spec.SCHEDULER_SHIFT} chosen at inference (see MODEL_CARD.md)",
        },
        "training": facts,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_averaged(out: Path, transformer: WanTransformer3DModel, encoder: TinyTextEncoder, ema: Ema | None,
                  facts: dict, transformer_config: dict) -> None:
    """Save the EMA weights (if any) without disturbing training."""
    if ema is not None:
        ema.swap()
    try:
        save(out, transformer, encoder, facts, transformer_config)
    finally:
        if ema is not None:
            ema.swap()


def plot_curve(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title("training loss (mean over each logging window)", fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)

    transformer = WanTransformer3DModel(**args.config)
    encoder = TinyTextEncoder(**spec.ENCODER_CONFIG)
    if args.grow:
        from safetensors.torch import load_file

        tiny_dir = ZOO / "weights"
        tiny_config = json.loads((tiny_dir / "config.json").read_text())["transformer"]
        state = load_file(str(tiny_dir / "tiny_t2v.safetensors"))
        grow_from_tiny(transformer, {k[12:]: v for k, v in state.items() if k.startswith("transformer.")},
                       tiny_config)
        encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    tokenizer = WordTokenizer()
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    n_params = {"transformer": sum(p.numel() for p in transformer.parameters()),
                "text_encoder": sum(p.numel() for p in encoder.parameters())}
    print(f"params {n_params}", flush=True)

    ema = Ema([transformer, encoder], args.ema) if args.ema > 0 else None
    log: list[dict] = []
    window: list[float] = []
    start = time.time()
    step = 0
    for step in range(args.steps):
        if (time.time() - start) / 60 > args.minutes:
            print(f"time budget of {args.minutes} min reached at step {step}", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        x0, prompts = sample_batch(args.batch_size, data_gen)
        drop = torch.rand(len(prompts), generator=noise_gen) < args.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        tok = tokenizer(prompts, padding="max_length", max_length=spec.TEXT_LEN, truncation=True)
        text = encoder(tok.input_ids, tok.attention_mask).last_hidden_state

        noise = torch.randn(x0.shape, generator=noise_gen)
        sigma = sample_sigmas(x0.shape[0], noise_gen, spec.TRAIN_SIGMA_SHIFT)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * noise
        pred = transformer(hidden_states=x_t, timestep=sigma * 1000.0, encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update(step)

        window.append(loss.item())
        if (step + 1) % args.log_every == 0:
            log.append({"step": step + 1, "loss": sum(window) / len(window), "seconds": time.time() - start})
            window.clear()
            print(f"step {step + 1} loss {log[-1]['loss']:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{log[-1]['seconds']:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0:
            save_averaged(args.out, transformer, encoder, ema, {"partial": True, "steps": step + 1}, args.config)
    else:
        step = args.steps

    seconds = time.time() - start
    facts = {
        "preset": args.preset,
        "grown_from": "tiny (tools/train_tiny_t2v.py grow_from_tiny)" if args.grow else None,
        "seed": args.seed,
        "steps_requested": args.steps,
        "steps": step,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "prompt_dropout": args.prompt_dropout,
        "ema_decay": args.ema,
        "sigma_sampling": f"uniform through shift {spec.TRAIN_SIGMA_SHIFT}",
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "final_loss": log[-1]["loss"] if log else None,
        "parameters": n_params,
    }
    save_averaged(args.out, transformer, encoder, ema, facts, args.config)
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    args.curve.with_suffix(".json").write_text(json.dumps(log) + "\n")
    if log:
        plot_curve(log, args.curve)
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
