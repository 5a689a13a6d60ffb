"""One sCD iteration's time over one pretraining iteration's: same MM-DiT, batch and device, side by side.

A pretraining iteration is the rectified-flow recipe's loss, backward and an AdamW step. An sCD iteration
is the sCD recipe's loss (the guided teacher: conditional + unconditional forward; the student's JVP and
with-grad pass), backward and an AdamW step, once per ``distill.jvp_pass`` (and per
``distill.tangent_precision`` given with ``--tangent-precisions``; one student serves them all):

  fused       one with-grad pass that also carries the tangent
  separate    a no-grad tangent pass, then the with-grad pass
  forward_ad  torch.func.jvp under no_grad, then the with-grad pass (the reference)

All of them and the pretraining iteration alternate iteration by iteration, so that noise on a shared
machine hits them alike; the report gives medians, ratios to pretraining, and each sCD iteration's split
(teacher; student passes; backward + AdamW). The paper's figure is ~2x.

    python benchmarks/scd_step.py                                     # small CPU config, ~1-2 minutes
    python benchmarks/scd_step.py --device cuda --depth 24 --resolution 512 --batch 8   # on a GPU

Plain Python, no Ray or MLflow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.config import load_config  # noqa: E402
from trainer.models.mmdit import build_mmdit  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.recipes.rectified_flow import RectifiedFlowRecipe  # noqa: E402
from trainer.recipes.scd import SCDRecipe, TrigFlowTeacher  # noqa: E402
from trainer.rng import RankStreams  # noqa: E402

PASSES = ("fused", "separate", "forward_ad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="bf16 = autocast to bfloat16 (default on cuda); fp32 elsewhere")
    p.add_argument("--depth", type=int, default=4, help="d: blocks and heads (24 = SD3-medium, 38 = 8B)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--resolution", type=int, default=128, help="pixel resolution; latents are resolution / 8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=32, help="154 in SD3 (77 CLIP + 77 T5)")
    p.add_argument("--context-dim", type=int, default=256, help="4096 in SD3 (T5-XXL)")
    p.add_argument("--pooled-dim", type=int, default=256, help="2048 in SD3")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="teacher guidance; 1.0 = one teacher forward")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each")
    p.add_argument("--iters", type=int, default=6, help="timed iterations of each")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch default)")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES, help="distill.jvp_pass values to time")
    p.add_argument("--tangent-precisions", nargs="+", choices=["fp32", "tf32", "bf16"],
                   help="distill.tangent_precision values to time with each pass (default: the config's)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SplitTimer:
    """Wraps a recipe's teacher and student passes to time them inside the real objective."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds[name] += time.perf_counter() - t0
            return out
        return timed


def scd_with_teacher(cfg, empty: dict, teacher_net: torch.nn.Module, device: torch.device) -> SCDRecipe:
    """An sCD recipe whose teacher is ``teacher_net`` in memory (no checkpoint)."""
    scd = SCDRecipe(cfg, empty)
    scd.teacher = TrigFlowTeacher(teacher_net, scd.empty_context.to(device), scd.empty_pooled.to(device),
                                  cfg.distill.sigma_d)
    return scd


def build_student(recipe: SCDRecipe, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The recipe's student, initialised with ``seed`` (its own init, not the teacher's weights)."""
    student = recipe.build_model().to_empty(device=device)
    student.init_weights(seed)
    return student


def measure(args: argparse.Namespace) -> dict:
    """Build the models, alternate the iterations, and return the medians: ``pretrain_s``, and per sCD run
    (a JVP pass, with its tangent precision when several are timed) the iteration's seconds, its ratio to
    pretraining (of the medians and the median of the pairs) and its split."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision is None and device.type == "cuda")
    latent = args.resolution // 8
    overrides = [
        f"model.depth={args.depth}", f"model.head_dim={args.head_dim}", "model.in_channels=16",
        "model.out_channels=16", f"model.context_dim={args.context_dim}", f"model.pooled_dim={args.pooled_dim}",
        f"model.pos_embed_max_size={max(latent // 2, 8)}", f"data.latent_size={latent}",
        f"data.text_tokens={args.text_tokens}", f"distill.cfg_scale={args.cfg_scale}",
        "distill.teacher=(in memory)", "distill.tangent_warmup=none", "optim.lr=1e-5",
    ]
    cfg = load_config(None, overrides)
    empty = {"text_tokens": torch.zeros(args.text_tokens, args.context_dim), "text_pooled": torch.zeros(args.pooled_dim)}

    rf = RectifiedFlowRecipe(cfg, empty)
    rf_model = build_mmdit(cfg.model, device=device)
    teacher_net = build_mmdit(cfg.model, device=device)
    runs = {"pretrain": (rf, rf_model, build_optimizer(rf_model, cfg.optim))}
    splits = {}
    precisions = args.tangent_precisions or [cfg.distill.tangent_precision]
    # One student and optimizer serve every sCD run: what they time does not depend on the weights, and a second
    # copy of a 2B-parameter model with its AdamW state would not fit next to the others on one GPU.
    student = build_student(scd_with_teacher(cfg, empty, teacher_net, device), device)
    optimizer = build_optimizer(student, cfg.optim)
    for jvp_pass in args.passes:
        for precision in precisions:
            name = jvp_pass if len(precisions) == 1 else f"{jvp_pass}, tangent {precision}"
            run_cfg = load_config(None, overrides + [f"distill.jvp_pass={jvp_pass}",
                                                     f"distill.tangent_precision={precision}"])
            scd = scd_with_teacher(run_cfg, empty, teacher_net, device)
            splits[name] = SplitTimer(device)
            scd.teacher_velocity = splits[name].wrap("teacher", scd.teacher_velocity)
            scd.student_passes = splits[name].wrap("student", scd.student_passes)
            runs[name] = (scd, student, optimizer)

    gen = torch.Generator().manual_seed(0)
    B = args.batch
    batch = {"latent": torch.randn(B, 16, latent, latent, generator=gen).to(device),
             "text_tokens": torch.randn(B, args.text_tokens, args.context_dim, generator=gen).to(device),
             "text_pooled": torch.randn(B, args.pooled_dim, generator=gen).to(device)}
    streams = RankStreams(0, 0, device)

    def iteration(name: str) -> float:
        recipe, model, optimizer = runs[name]
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = recipe.loss(model, batch, streams)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    times = {name: [] for name in runs}
    parts = {name: [] for name in splits}
    for i in range(args.warmup + args.iters):
        for name in runs:
            if name in splits:
                splits[name].seconds.clear()
            elapsed = iteration(name)
            if i >= args.warmup:
                times[name].append(elapsed)
                if name in splits:
                    seconds = splits[name].seconds
                    parts[name].append({**seconds, "backward": elapsed - sum(seconds.values())})

    pretrain = statistics.median(times["pretrain"])
    rows = []
    for name in splits:
        row = {"run": name, "iteration_s": statistics.median(times[name])}
        row["ratio"] = row["iteration_s"] / pretrain
        row["ratio_of_pairs"] = statistics.median(s / p for s, p in zip(times[name], times["pretrain"]))
        for part in ("teacher", "student", "backward"):
            row[part] = statistics.median(p[part] for p in parts[name]) / pretrain
        rows.append(row)
    threads = f"cpu ({torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    return {"device": device_name, "bf16": bf16, "params": sum(p.numel() for p in rf_model.parameters()),
            "latent": latent, "pretrain_s": pretrain, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| jvp_pass | sCD iteration | / pretraining (medians) | median of pairs | teacher | student passes "
             "| backward + AdamW |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {r['iteration_s'] * 1e3:.1f} ms | **{r['ratio']:.2f}x** | "
                     f"{r['ratio_of_pairs']:.2f}x | {r['teacher']:.2f}x | {r['student']:.2f}x | {r['backward']:.2f}x |")
    lines.append("\n(the split columns are each part's median time over the pretraining iteration's)")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    result = measure(args)
    latent = result["latent"]
    print(f"device {result['device']}, torch {torch.__version__}, {'bf16 autocast' if result['bf16'] else 'fp32'}; "
          f"depth {args.depth}, head_dim {args.head_dim}, {result['params'] / 1e6:.1f}M params, batch {args.batch}, "
          f"latent {latent}x{latent}, {args.text_tokens} text tokens, teacher CFG w={args.cfg_scale}, "
          f"{args.iters} timed iterations each")
    print(f"pretraining iteration {result['pretrain_s'] * 1e3:9.1f} ms (median)\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
