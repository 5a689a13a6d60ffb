"""`python -m trainer.inspect`: exact parameters, stream-aware FLOPs that agree with FlopCounterMode, and an
activation model that matches what a block really saves for backward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from infra.config import load_config
from trainer import flops
from trainer.inspect import inspect_config
from trainer.models.mmdit import build_mmdit

REPO = Path(__file__).resolve().parents[2]


def test_the_8b_preset_answers_with_exact_parameters_and_json_keys():
    out = subprocess.run([sys.executable, "-m", "trainer.inspect", "mmdit-8b", "--gpus", "64", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["params"] == 8_056_627_520
    assert sum(report["params_per_stream"].values()) == report["params"]
    assert {"params", "flops_per_sample", "memory_per_gpu_gib"} <= set(report)
    assert abs(report["flops_formula_over_counted"] - 1) < 0.02  # embedders and the pre-only stream aside
    mem = report["memory_per_gpu_gib"]
    assert mem["with_checkpointing"]["activations"] < mem["without_checkpointing"]["activations"]


def test_memory_shards_with_the_number_of_gpus():
    cfg = load_config("mmdit-2b")
    one, eight = (inspect_config(cfg, g, micro_batch=4, count_flops=False)["memory_per_gpu_gib"] for g in (1, 8))
    for key in ("params", "grads", "optimizer", "ema"):
        assert abs(one["without_checkpointing"][key] / eight["without_checkpointing"][key] - 8) < 1e-9


def test_hsdp_memory_stays_that_of_one_shard_group_however_many_gpus_join():
    plain = inspect_config(load_config("mmdit-2b"), 8, micro_batch=4, count_flops=False)
    cfg = load_config("mmdit-2b", ["cluster.num_workers=64", "cluster.shard_size=8"])
    hsdp = inspect_config(cfg, 64, micro_batch=4, count_flops=False)
    assert hsdp["shard_group"] == 8 and hsdp["replicas"] == 8
    assert hsdp["memory_per_gpu_gib"] == plain["memory_per_gpu_gib"]


def test_a_config_typo_is_reported_by_key():
    out = subprocess.run([sys.executable, "-m", "trainer.inspect", "demo", "model.dpeth=3"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "model.dpeth" in out.stderr and "model.depth" in out.stderr


def test_saved_activations_per_token_match_the_memory_model():
    cfg = load_config("demo", ["model.depth=3", "model.head_dim=32", "data.latent_size=16"])
    model = build_mmdit(cfg.model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    B = 2
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(B, 1, 16, 16), torch.rand(B), torch.randn(B, 16, 64), torch.randn(B, 64))
    img, txt = flops.tokens(cfg)
    per_token = sum(saved.values()) / 4 / (B * (img + txt) * cfg.model.depth * cfg.model.hidden_size)
    assert abs(per_token / flops.SAVED_ELEMENTS_PER_TOKEN_PER_BLOCK - 1) < 0.05, per_token


def test_hsdp_divides_the_training_state_by_the_shard_group_not_by_all_gpus():
    cfg = load_config("mmdit-2b")
    hsdp = inspect_config(cfg, 64, micro_batch=4, count_flops=False, shard_size=8)
    fsdp = inspect_config(cfg, 64, micro_batch=4, count_flops=False, shard_size=0)
    n, gib = hsdp["params"], 2.0**30
    for key, copies in (("params", 1), ("grads", 1), ("optimizer", 2), ("ema", 1)):
        assert abs(hsdp["memory_per_gpu_gib"]["with_checkpointing"][key] - copies * 4 * n / 8 / gib) < 1e-9
        assert abs(fsdp["memory_per_gpu_gib"]["with_checkpointing"][key] - copies * 4 * n / 64 / gib) < 1e-9
    for key in ("gathered_params", "activations"):  # per GPU whatever the sharding
        assert hsdp["memory_per_gpu_gib"]["with_checkpointing"][key] == fsdp["memory_per_gpu_gib"]["with_checkpointing"][key]
    assert (hsdp["shard_group"], hsdp["replicas"]) == (8, 8) and (fsdp["shard_group"], fsdp["replicas"]) == (64, 1)


def test_the_shard_group_defaults_to_the_configs_cluster_shard_size():
    cfg = load_config("mmdit-2b", ["cluster.num_workers=16", "cluster.shard_size=8"])
    assert inspect_config(cfg, 16, micro_batch=4, count_flops=False)["shard_group"] == 8


def test_hsdp_keeps_gathers_in_the_node_and_all_reduces_gradient_shards_across_replicas():
    n = 1_000_000_000
    fsdp = flops.communication_per_step(n, 64)
    hsdp = flops.communication_per_step(n, 64, shard_size=8)
    # Ring collectives move (k - 1) / k of the data: two bf16 all-gathers and an fp32 reduce-scatter per step.
    assert abs(fsdp["shard"] - 8 * n * 63 / 64) < 1 and fsdp["replicate"] == 0
    assert abs(hsdp["shard"] - 8 * n * 7 / 8) < 1
    assert abs(hsdp["replicate"] - 2 * (4 * n / 8) * 7 / 8) < 1  # an fp32 gradient shard, all-reduced over 8
    assert flops.communication_per_step(n, 1) == {"shard": 0, "replicate": 0}


def test_step_time_and_data_rate_follow_from_the_flops_at_the_stated_mfu():
    cfg = load_config("mmdit-2b")
    r = inspect_config(cfg, 64, count_flops=False, shard_size=8)
    t = r["throughput"]
    assert abs(t["step_seconds"] - 4096 * r["flops_per_sample"] / (64 * 989e12 * 0.4)) < 1e-9
    stored = 2 * (16 * 32 * 32 + 154 * 4096 + 2048)  # bf16 latent, T5+CLIP tokens, pooled vector
    assert abs(t["mib_per_second_per_node"] - 8 * t["samples_per_second_per_gpu"] * stored / 2**20) < 1e-6


def test_a_shard_size_that_does_not_divide_the_gpus_is_reported():
    out = subprocess.run([sys.executable, "-m", "trainer.inspect", "demo", "--gpus", "12", "--shard-size", "8",
                          "--no-count"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "8" in out.stderr and "12" in out.stderr
