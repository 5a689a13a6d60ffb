"""``python -m trainer.inspect CONFIG [key=value ...] [--gpus N] [--shard-size N] [--json]``: what a config costs.

Parameters (total and per stream), training FLOPs per sample (the stream-aware formula, cross-checked by
``torch.utils.flop_counter`` on the meta device), an FSDP2 or HSDP memory estimate per GPU, the bytes each
GPU moves per step, and the step time, samples/s and data rate per node at a stated MFU: computed, not
measured, before a cluster is spent. Everything is built on the meta device, so the 8B preset answers in
seconds on a laptop.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

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


@dataclass
class Hardware:
    """What the step-time and communication figures assume (H100/H200 SXM: dense bf16 peak, NVLink 4 per
    direction, one 400 Gb/s NIC per GPU)."""

    mfu: float = 0.4
    peak_tflops: float = flops.PEAK_TFLOPS["H100"]
    gpus_per_node: int = 8
    intra_node_gbs: float = 450.0
    network_gbs: float = 50.0


def throughput(cfg: JobConfig, flops_per_sample: float, gpus: int, hw: Hardware) -> dict:
    step = flops.step_seconds(flops_per_sample, cfg.train.global_batch_size, gpus, hw.peak_tflops, hw.mfu)
    per_gpu = cfg.train.global_batch_size / step / gpus
    mib = flops.sample_bytes(cfg) / 2.0**20
    return {
        "mfu": hw.mfu,
        "peak_tflops": hw.peak_tflops,
        "step_seconds": step,
        "samples_per_second": per_gpu * gpus,
        "samples_per_second_per_gpu": per_gpu,
        "sample_mib": mib,
        "mib_per_second_per_gpu": per_gpu * mib,
        "mib_per_second_per_node": per_gpu * mib * min(gpus, hw.gpus_per_node),
        "mib_per_second": per_gpu * mib * gpus,
    }


def communication(n_params: int, gpus: int, shard_size: int, hw: Hardware) -> dict:
    """Bytes per GPU per step and the seconds they take on the link each collective crosses: NVLink while
    its ranks fit in one node (ranks are numbered node by node), the network otherwise."""
    sent = flops.communication_per_step(n_params, gpus, shard_size)
    group = flops.shard_group(gpus, shard_size)
    links = {"shard": group <= hw.gpus_per_node, "replicate": gpus <= hw.gpus_per_node}
    out: dict = {}
    for key, within_node in links.items():
        gbs = hw.intra_node_gbs if within_node else hw.network_gbs
        out[key] = {"gb": sent[key] / 1e9, "link": "nvlink" if within_node else "network",
                    "seconds": sent[key] / 1e9 / gbs}
    return out


def inspect_config(cfg: JobConfig, gpus: int, micro_batch: int | None = None, count_flops: bool = True,
                   shard_size: int | None = None, hardware: Hardware | None = None) -> dict:
    """The report of ``python -m trainer.inspect``; ``shard_size`` defaults to the config's cluster.shard_size
    (0 = plain FSDP2 over all ``gpus``)."""
    hw = hardware or Hardware()
    shard = cfg.cluster.shard_size if shard_size is None else shard_size
    group = flops.shard_group(gpus, shard)
    with torch.device("meta"):
        model = MMDiT(cfg.model)
    params = count_params(model)
    block_params = sum(p.numel() for p in model.joint_blocks[0].parameters())
    img, txt = flops.tokens(cfg)
    formula = flops.training_flops_per_sample(cfg.model, img, txt)
    micro = micro_batch or max(1, cfg.train.global_batch_size // gpus)
    mem = flops.memory_per_gpu(cfg, params["total"], block_params, gpus, micro, shard_size=shard)
    report = {
        "config": cfg.name,
        "depth": cfg.model.depth,
        "hidden_size": cfg.model.hidden_size,
        "params": params["total"],
        "params_per_stream": {k: v for k, v in params.items() if k != "total"},
        "tokens_per_sample": {"image": img, "text": txt},
        "flops_per_sample": formula,
        "gpus": gpus,
        "shard_group": group,
        "replicas": gpus // group,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_per_gpu": micro,
        "memory_per_gpu_gib": {
            "without_checkpointing": mem.as_gib(checkpointing=False),
            "with_checkpointing": mem.as_gib(checkpointing=True),
        },
        "communication_per_gpu_per_step": communication(params["total"], gpus, shard, hw),
        "throughput": throughput(cfg, formula, gpus, hw),
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
    if r["replicas"] > 1:
        layout = f"HSDP: shard groups of {r['shard_group']}, {r['replicas']} replicas"
    else:
        layout = "FSDP2 over all of them"
    lines.append(f"memory per GPU, {r['gpus']} GPU(s), {layout}, micro-batch {r['micro_batch_per_gpu']} (GiB):")
    no, yes = r["memory_per_gpu_gib"]["without_checkpointing"], r["memory_per_gpu_gib"]["with_checkpointing"]
    lines.append(f"  {'':<18}{'no checkpointing':>18}{'checkpointing':>16}")
    for key in no:
        lines.append(f"  {key:<18}{no[key]:>18.2f}{yes[key]:>16.2f}")
    lines.append("communication per GPU per step (computed; seconds if not overlapped with compute):")
    for key, c in r["communication_per_gpu_per_step"].items():
        lines.append(f"  {key:<18}{c['gb']:>8.2f} GB over {c['link']:<8}{c['seconds']:>8.3f} s")
    t = r["throughput"]
    lines.append(f"at {t['mfu']:.0%} MFU of {t['peak_tflops']:.0f} TFLOP/s (computed, not measured):")
    lines.append(f"  step                {t['step_seconds']:.3f} s for a global batch of {r['global_batch_size']}")
    lines.append(f"  samples/s           {t['samples_per_second']:,.0f} ({t['samples_per_second_per_gpu']:.1f} per GPU)")
    lines.append(f"  data                {t['sample_mib']:.3f} MiB/sample: {t['mib_per_second_per_gpu']:.1f} MiB/s per "
                 f"GPU, {t['mib_per_second_per_node']:.1f} MiB/s per node, {t['mib_per_second']:.0f} MiB/s in all")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="preset name (configs/NAME.yaml) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=38")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs for the memory estimate")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="HSDP shard group (GPUs); 0 = FSDP2 over all GPUs (default: cluster.shard_size)")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per GPU (default: global/gpus)")
    defaults = Hardware()
    parser.add_argument("--mfu", type=float, default=defaults.mfu, help="model FLOP utilisation assumed")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"dense bf16 peak per GPU (default: train.peak_tflops, else {defaults.peak_tflops:.0f})")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--intra-node-gbs", type=float, default=defaults.intra_node_gbs,
                        help="GB/s per GPU within a node (NVLink, one direction)")
    parser.add_argument("--network-gbs", type=float, default=defaults.network_gbs,
                        help="GB/s per GPU between nodes (its NIC)")
    parser.add_argument("--no-count", action="store_true", help="skip the FlopCounterMode cross-check")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus must be at least 1, got {args.gpus}")
    try:
        cfg = load_config(args.config, args.overrides)
        shard = cfg.cluster.shard_size if args.shard_size is None else args.shard_size
        flops.shard_group(args.gpus, shard)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak = args.peak_tflops or cfg.train.peak_tflops or defaults.peak_tflops
    hw = Hardware(args.mfu, peak, args.gpus_per_node, args.intra_node_gbs, args.network_gbs)
    report = inspect_config(cfg, args.gpus, args.micro_batch, count_flops=not args.no_count, shard_size=shard,
                            hardware=hw)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
