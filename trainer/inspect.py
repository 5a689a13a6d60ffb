"""``python -m trainer.inspect CONFIG [key=value ...] [--gpus N] [--json]``: what a config costs.

Parameters (total and per stream), training FLOPs per sample (the stream-aware formula, cross-checked by
``torch.utils.flop_counter`` on the meta device) and an FSDP2 memory estimate per GPU, before a cluster
is spent. Everything is built on the meta device, so the 8B preset answers in seconds on a laptop.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from infra.config import ConfigError, JobConfig, load_config
from trainer import flops
from trainer.models.mmdit import MMDiT, count_params


def counted_flops_per_sample(model: MMDiT, cfg: JobConfig) -> float:
    """Forward + backward FLOPs of one sample, counted op by op on meta tensors."""
    m, size = cfg.model, cfg.data.latent_size
    with torch.device("meta"):
        x = torch.empty(1, m.in_channels, size, size)
        t = torch.empty(1)
        context = torch.empty(1, cfg.data.text_tokens, m.context_dim)
        pooled = torch.empty(1, m.pooled_dim)
    with FlopCounterMode(display=False) as counter:
        model(x, t, context, pooled).sum().backward()
    return float(counter.get_total_flops())


def inspect_config(cfg: JobConfig, gpus: int, micro_batch: int | None = None, count_flops: bool = True) -> dict:
    with torch.device("meta"):
        model = MMDiT(cfg.model)
    params = count_params(model)
    block_params = sum(p.numel() for p in model.joint_blocks[0].parameters())
    img, txt = flops.tokens(cfg)
    formula = flops.training_flops_per_sample(cfg.model, img, txt)
    micro = micro_batch or max(1, cfg.train.global_batch_size // gpus)
    mem = flops.memory_per_gpu(cfg, params["total"], block_params, gpus, micro)
    report = {
        "config": cfg.name,
        "depth": cfg.model.depth,
        "hidden_size": cfg.model.hidden_size,
        "params": params["total"],
        "params_per_stream": {k: v for k, v in params.items() if k != "total"},
        "tokens_per_sample": {"image": img, "text": txt},
        "flops_per_sample": formula,
        "gpus": gpus,
        "micro_batch_per_gpu": micro,
        "state_sharded_over": flops.state_shards(cfg, gpus),
        "memory_per_gpu_gib": {
            "without_checkpointing": mem.as_gib(checkpointing=False),
            "with_checkpointing": mem.as_gib(checkpointing=True),
        },
    }
    if count_flops:
        counted = counted_flops_per_sample(model, cfg)
        report["flops_per_sample_counted"] = counted
        report["flops_formula_over_counted"] = formula / counted
    return report


def format_report(r: dict) -> str:
    lines = [
        f"config {r['config']}: depth {r['depth']}, hidden {r['hidden_size']}",
        f"parameters            {r['params']:,}",
    ]
    for k, v in r["params_per_stream"].items():
        lines.append(f"  {k:<20}{v:,}")
    tok = r["tokens_per_sample"]
    lines.append(f"tokens per sample     {tok['image']} image + {tok['text']} text")
    lines.append(f"train FLOPs / sample  {r['flops_per_sample'] / 1e12:.3f} TFLOP (72 d D^2 S + 12 d D S^2)")
    if "flops_per_sample_counted" in r:
        lines.append(
            f"  counted (FlopCounterMode)  {r['flops_per_sample_counted'] / 1e12:.3f} TFLOP "
            f"(formula / counted = {r['flops_formula_over_counted']:.3f})"
        )
    shards = f", state sharded over {r['state_sharded_over']} (HSDP)" if r["state_sharded_over"] < r["gpus"] else ""
    lines.append(f"FSDP2 memory per GPU, {r['gpus']} GPU(s){shards}, micro-batch {r['micro_batch_per_gpu']} (GiB):")
    no, yes = r["memory_per_gpu_gib"]["without_checkpointing"], r["memory_per_gpu_gib"]["with_checkpointing"]
    lines.append(f"  {'':<18}{'no checkpointing':>18}{'checkpointing':>16}")
    for key in no:
        lines.append(f"  {key:<18}{no[key]:>18.2f}{yes[key]:>16.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="preset name (configs/NAME.yaml) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=38")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs for the memory estimate")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per GPU (default: global/gpus)")
    parser.add_argument("--no-count", action="store_true", help="skip the FlopCounterMode cross-check")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus must be at least 1, got {args.gpus}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = inspect_config(cfg, args.gpus, args.micro_batch, count_flops=not args.no_count)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
