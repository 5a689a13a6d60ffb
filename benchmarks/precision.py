"""bf16 autocast against fp32: one training step's loss and gradient, per recipe and sCD JVP pass.

Each row builds a model and a batch and takes one step of the recipe's loss and backward twice, in fp32 and
under ``torch.autocast(bfloat16)`` (emulated on CPU), with the same random draws. It reports the relative
error of the loss, and the relative L2 error and cosine similarity of the gradient, of the whole network
(all its parameters concatenated; sCD's log-variance head left out) and of its joint blocks alone (see
``fidelity``): worst and median over ``--seeds`` seeds. The sizes are SD3-like where precision depends on
them (16 latent channels, 64x64 latents, patch 2: 1024 image tokens) and small elsewhere (depth, width,
text), so that it runs on a CPU. sCD rows use ``distill.tangent_warmup=none`` (r = 1: the JVP term in full),
both weightings (``fixed`` is the plain consistency error, whose gradient is the tangent's alone;
``adaptive`` adds the learned log-variance u) and each ``distill.tangent_precision`` (TF32 only on CUDA: on
a CPU it is fp32).

    python benchmarks/precision.py                       # CPU, bf16 emulated; ~10 minutes on 2 cores
    python benchmarks/precision.py --device cuda --seeds 5

Plain Python, no Ray or MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scd_step import build_student, scd_with_teacher  # noqa: E402
from infra.config import JobConfig, load_config  # noqa: E402
from trainer.models.mmdit import build_mmdit, canonical_name  # noqa: E402
from trainer.parallelize import network  # noqa: E402
from trainer.recipes.rectified_flow import RectifiedFlowRecipe  # noqa: E402
from trainer.rng import RankStreams  # noqa: E402

PASSES = ("fused", "separate", "forward_ad")
WEIGHTINGS = ("fixed", "adaptive")
PRECISIONS = ("fp32", "tf32", "bf16")  # distill.tangent_precision; tf32 is fp32 off CUDA


def sizes(latent: int = 64, depth: int = 2, head_dim: int = 32, text_tokens: int = 8, text_dim: int = 32) -> list[str]:
    """Config overrides: SD3's latent channels and patch at ``latent`` x ``latent``, a small network and text."""
    return [
        f"model.depth={depth}", f"model.head_dim={head_dim}", "model.in_channels=16", "model.out_channels=16",
        "model.patch_size=2", f"model.context_dim={text_dim}", f"model.pooled_dim={text_dim}",
        f"model.pos_embed_max_size={latent // 2}", f"data.latent_size={latent}", f"data.text_tokens={text_tokens}",
    ]


def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Seeded N(0, scale^2) noise on every parameter, by name: moves a fresh model off adaLN-Zero's identity
    blocks and zero output, so every layer takes part in the loss and its gradient."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed((seed + zlib.crc32(canonical_name(name).encode())) % 2**63)
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.device, p.dtype))


def build(recipe: str, overrides: list[str], device: torch.device, seed: int):
    """(config, recipe, model) for ``recipe`` ("rectified_flow" or "scd"). sCD gets an in-memory teacher (the
    init plus noise) and a student that starts from it plus smaller noise, as a student in training."""
    cfg = load_config(None, overrides + ["distill.teacher=(in memory)", "distill.tangent_warmup=none"])
    empty = {"text_tokens": torch.zeros(cfg.data.text_tokens, cfg.model.context_dim),
             "text_pooled": torch.zeros(cfg.model.pooled_dim)}
    net = build_mmdit(cfg.model, device=device)
    perturb(net, seed, 0.05)
    if recipe == "rectified_flow":
        return cfg, RectifiedFlowRecipe(cfg, empty), net
    scd = scd_with_teacher(cfg, empty, net, device)
    student = build_student(scd, device)
    student.net.load_state_dict(net.state_dict())
    perturb(student, seed + 1, 0.02)
    return cfg, scd, student


def synthetic_batch(cfg: JobConfig, batch: int, seed: int, device: torch.device) -> dict:
    """Unit-variance latents (SD3's VAE latents are normalised) and Gaussian text features."""
    m, L, H = cfg.model, cfg.data.text_tokens, cfg.data.latent_size
    gen = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(batch, m.in_channels, H, H, generator=gen).to(device),
            "text_tokens": torch.randn(batch, L, m.context_dim, generator=gen).to(device),
            "text_pooled": torch.randn(batch, m.pooled_dim, generator=gen).to(device)}


def step(recipe, model: torch.nn.Module, batch: dict, bf16: bool, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One step's loss and the network's gradients by parameter name (float64), the loop's way: the recipe's
    loss under autocast (bf16) or with autocast off (fp32), then backward."""
    device = batch["latent"].device
    model.zero_grad(set_to_none=True)
    recipe.at_step(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = recipe.loss(model, batch, RankStreams(seed, 0, device))
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().double().flatten() for n, p in network(model).named_parameters()}


def fidelity(loss: float, grads: dict, ref_loss: float, ref_grads: dict) -> dict[str, float]:
    """Relative and absolute loss error, and the relative L2 error and cosine similarity of the gradient against the
    reference's: of the whole network and of its joint blocks. Under sCD's adaptive weighting the conditioning
    embedders also receive u's gradient, which dwarfs the consistency term's (about 1e4x at these sizes); the
    joint blocks reach the loss through F alone."""
    out = {"loss_err": abs(loss - ref_loss) / abs(ref_loss), "loss_abs_err": abs(loss - ref_loss)}
    for part, keep in (("", lambda name: True), ("_blocks", lambda name: name.startswith("joint_blocks."))):
        names = [n for n in ref_grads if keep(canonical_name(n))]
        grad, ref = torch.cat([grads[n] for n in names]), torch.cat([ref_grads[n] for n in names])
        out[f"grad_err{part}"] = float((grad - ref).norm() / ref.norm())
        out[f"cosine{part}"] = float(torch.nn.functional.cosine_similarity(grad, ref, dim=0))
    return out


def bf16_against_fp32(recipe: str, overrides: list[str], device: torch.device, seed: int,
                      batch: int) -> dict[str, float]:
    """The fidelity of one bf16 step against the fp32 step of the same model, batch and random draws."""
    cfg, rec, model = build(recipe, overrides, device, seed)
    data = synthetic_batch(cfg, batch, seed, device)
    ref_loss, ref_grads = step(rec, model, data, False, seed)
    loss, grads = step(rec, model, data, True, seed)
    return fidelity(loss, grads, ref_loss, ref_grads)


def configurations(passes=PASSES, weightings=WEIGHTINGS, precisions=PRECISIONS) -> list[tuple[str, str, list[str]]]:
    """(recipe, row label, extra overrides) of every row of the table."""
    rows = [("rectified_flow", "rectified flow", [])]
    for jvp_pass in passes:
        for weighting in weightings:
            for precision in precisions:
                rows.append(("scd", f"sCD {jvp_pass}, {weighting}, tangent {precision}",
                             [f"distill.jvp_pass={jvp_pass}", f"distill.weighting={weighting}",
                              f"distill.tangent_precision={precision}"]))
    return rows


FIGURES = ("loss_err", "loss_abs_err", "grad_err", "cosine", "grad_err_blocks", "cosine_blocks")


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls and convolutions without TF32 (cuDNN allows it by default), so that the fp32 step is the
    reference; a tf32 tangent allows it for itself (``tangent.matmul_precision``)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def measure(device: torch.device, size: list[str], seeds: int, batch: int, rows=None) -> list[dict]:
    """One dict per row: the label and the worst and median of each fidelity figure over the seeds."""
    out = []
    for recipe, label, extra in rows or configurations():
        with ieee_fp32():
            runs = [bf16_against_fp32(recipe, size + extra, device, seed, batch) for seed in range(seeds)]
        row = {"row": label}
        for key in FIGURES:
            values = [r[key] for r in runs]
            row[f"{key}_worst"] = min(values) if key.startswith("cosine") else max(values)
            row[f"{key}_median"] = statistics.median(values)
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe, JVP pass, weighting, tangent | loss error, relative / absolute | gradient error, network "
             "| gradient error, joint blocks | cosine, network / joint blocks |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['loss_err_worst']:.2%} / {r['loss_abs_err_worst']:.1e} | "
                     f"{r['grad_err_worst']:.2%} ({r['grad_err_median']:.2%}) | "
                     f"{r['grad_err_blocks_worst']:.2%} ({r['grad_err_blocks_median']:.2%}) | "
                     f"{r['cosine_worst']:.5f} / {r['cosine_blocks_worst']:.5f} |")
    lines.append("\n(the worst over the seeds; the median in brackets)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512^2 px in SD3's VAE)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (model, batch and draws)")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="distill.tangent_precision values "
                   "(default: fp32 and bf16 on CPU, where tf32 is fp32; all three on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = sizes(args.latent, args.depth, args.head_dim)
    start = time.perf_counter()
    precisions = args.precisions or [p for p in PRECISIONS if device.type == "cuda" or p != "tf32"]
    rows = measure(device, size, args.seeds, args.batch, configurations(args.passes, precisions=precisions))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bf16 autocast against fp32, one step; {name}, torch {torch.__version__}; 16x{args.latent}x{args.latent} "
          f"latents, patch 2, depth {args.depth}, head_dim {args.head_dim}, batch {args.batch}, {args.seeds} seeds "
          f"({time.perf_counter() - start:.0f} s)\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
