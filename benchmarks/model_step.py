"""Forward + backward time of our MM-DiT against diffusers' ``SD3Transformer2DModel`` of identical sizes.

Both models get the same depth, heads, head width, patch, channels, context and pooled widths,
positional table and QK RMSNorm, the same random weights scheme and the same inputs; one timed step is
forward, an MSE loss against a fixed target, and backward. The two models alternate step by step so that
noise on a shared machine hits both alike; the result is a ratio (ours / diffusers): of the median steps,
and the median of the back-to-back pairs' ratios.

    python benchmarks/model_step.py                                   # small CPU config, a few minutes
    python benchmarks/model_step.py --device cuda --depth 24 --resolution 256   # SD3-medium on a GPU

Needs ``diffusers`` (``pip install -e .[bench]``); plain Python, no Ray or MLflow.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.config import ModelConfig  # noqa: E402
from trainer.models.mmdit import build_mmdit, count_params  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="bf16 = autocast to bfloat16 (default on cuda); fp32 elsewhere")
    p.add_argument("--depth", type=int, default=4, help="d: blocks and heads (24 = SD3-medium, 38 = 8B)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256, help="pixel resolution; latents are resolution / 8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=154, help="77 CLIP + 77 T5 in SD3")
    p.add_argument("--context-dim", type=int, default=4096)
    p.add_argument("--pooled-dim", type=int, default=2048)
    p.add_argument("--pos-embed-max-size", type=int, default=192)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--iters", type=int, default=8, help="timed steps per model")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch default)")
    p.add_argument("--profile", action="store_true", help="print the top operators of one step of each model")
    return p.parse_args()


def build_ours(cfg: ModelConfig, device: torch.device) -> nn.Module:
    return build_mmdit(cfg, device=device)


def build_diffusers(cfg: ModelConfig, latent: int, device: torch.device) -> nn.Module:
    """diffusers' SD3 transformer of ``cfg``'s sizes; ImportError (saying what to install) without diffusers."""
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError as error:
        raise ImportError("diffusers is not installed: pip install diffusers (or pip install -e .[bench])") from error
    return SD3Transformer2DModel(
        sample_size=latent,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        qk_norm="rms_norm",
    ).to(device)


QK_NORM_SCALE = re.compile(r"(ln|norm)_(added_)?[qk]\.weight$")  # ours: ln_q; diffusers: norm_q, norm_added_q


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """The same scheme for both models (N(0, 0.02), QK-norm scales 1), so neither computes with zero-init
    adaLN weights or outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.ones(p.shape) if QK_NORM_SCALE.search(name) else torch.randn(p.shape, generator=gen) * 0.02)


def step_inputs(cfg: ModelConfig, batch: int, latent: int, text_tokens: int, device: torch.device) -> dict:
    """Seeded latents, times, text and a regression target, the same for both models."""
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "x": torch.randn(batch, cfg.in_channels, latent, latent, generator=gen),
        "t": torch.rand(batch, generator=gen),
        "context": torch.randn(batch, text_tokens, cfg.context_dim, generator=gen),
        "pooled": torch.randn(batch, cfg.pooled_dim, generator=gen),
        "target": torch.randn(batch, cfg.out_channels, latent, latent, generator=gen),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def make_step(model: nn.Module, is_ours: bool, inputs: dict, amp_dtype, device: torch.device):
    x, t, context, pooled, target = (inputs[k] for k in ("x", "t", "context", "pooled", "target"))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if is_ours:
                out = model(x, t, context, pooled)
            else:
                out = model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                            timestep=1000.0 * t, return_dict=False)[0]
            loss = F.mse_loss(out.float(), target)
        loss.backward()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def alternate(steps: dict, device: torch.device, warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` (name -> step function) per timed step, the steps taking turns and
    alternating who goes first, so that noise on a shared machine hits them alike."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(timed(steps[name], device))
    return times


def ratios(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """(ratio of the medians, median of the back-to-back pairs' ratios): each pair ran back to back, so its
    ratio cancels slow drifts of a shared machine's load."""
    return (statistics.median(ours) / statistics.median(theirs),
            statistics.median(a / b for a, b in zip(ours, theirs)))


def profile(name: str, step, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### {name}: top operators of one step\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    if args.resolution % 8 or (args.resolution // 8) % 2:
        sys.exit(f"--resolution {args.resolution}: the latent side (resolution / 8) must be even for patch 2")
    latent = args.resolution // 8

    cfg = ModelConfig(
        depth=args.depth, head_dim=args.head_dim, in_channels=16, out_channels=16, patch_size=2,
        pooled_dim=args.pooled_dim, context_dim=args.context_dim, pos_embed_max_size=args.pos_embed_max_size,
    )
    try:
        ours, theirs = build_ours(cfg, device), build_diffusers(cfg, latent, device)
    except ImportError as error:
        sys.exit(str(error))
    randomize(ours, 0)
    randomize(theirs, 0)
    n_ours, n_theirs = count_params(ours)["total"], sum(p.numel() for p in theirs.parameters())

    B = args.batch
    inputs = step_inputs(cfg, B, latent, args.text_tokens, device)
    steps = {
        "flowscale MMDiT": make_step(ours, True, inputs, amp_dtype, device),
        "diffusers SD3Transformer2DModel": make_step(theirs, False, inputs, amp_dtype, device),
    }
    names = list(steps)
    times = alternate(steps, device, args.warmup, args.iters)

    tokens = (latent // 2) ** 2 + args.text_tokens
    print(f"\nModel step (forward + backward), {device.type}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, "
          f"{precision}, torch {torch.__version__}")
    print(f"depth {cfg.depth}, hidden {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}, "
          f"{latent}x{latent} latents ({args.resolution}^2 px), batch {B}, {tokens} tokens "
          f"({(latent // 2) ** 2} image + {args.text_tokens} text), {args.iters} timed steps after {args.warmup} warmup\n")
    print("| model | parameters | median step (ms) | min (ms) | max (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, n in zip(names, (n_ours, n_theirs)):
        ts = [1000 * s for s in times[name]]
        print(f"| {name} | {n:,} | {statistics.median(ts):.1f} | {min(ts):.1f} | {max(ts):.1f} |")
    ratio, paired = ratios(times[names[0]], times[names[1]])
    print(f"\nratio ours / diffusers: {ratio:.3f} (medians), {paired:.3f} (median of back-to-back pairs)")
    if n_ours != n_theirs:
        print(f"parameter counts differ by {n_ours - n_theirs:+,}")

    if args.profile:
        for name in names:
            profile(name, steps[name], device)


if __name__ == "__main__":
    main()
