"""What a configuration costs: parameters, training FLOPs (stream-aware) and FSDP2 memory per GPU."""

from __future__ import annotations

from dataclasses import dataclass

from infra.config import JobConfig, ModelConfig

# Activation elements a joint block saves for backward, per token, in units of the model width D
# (measured with saved-tensor hooks; tests/trainer/test_inspect.py re-measures it). Attention itself
# saves only O(S * D) (flash-style kernels keep the log-sum-exp, not the S x S matrix).
SAVED_ELEMENTS_PER_TOKEN_PER_BLOCK = 26.3

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16; the 1,979 figure is sparse


def tokens(cfg: JobConfig) -> tuple[int, int]:
    """(image tokens, text tokens) of one sample."""
    grid = cfg.data.latent_size // cfg.model.patch_size
    return grid * grid, cfg.data.text_tokens


def training_flops_per_sample(model: ModelConfig, image_tokens: int, text_tokens: int) -> float:
    """72 d D^2 S + 12 d D S^2 (MMDIT_RF.md section 4): each token passes only its own stream's linears
    (qkv, out, MLP: 24 D^2 forward FLOPs, x3 for training) and joint attention costs 4 S^2 D forward."""
    d, D, S = model.depth, model.hidden_size, image_tokens + text_tokens
    return 72.0 * d * D * D * S + 12.0 * d * D * S * S


def peak_tflops_for(device_name: str, override: float = 0.0) -> float:
    """Dense bf16 peak of a GPU by name (0 when unknown: MFU is then not reported)."""
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return 0.0


@dataclass
class MemoryEstimate:
    """Bytes per GPU under FSDP2 (fp32 master params sharded, bf16 compute, fp32 reduce, AdamW, EMA)."""

    params: float
    grads: float
    optimizer: float
    ema: float
    gathered_params: float
    activations: float
    activations_checkpointed: float

    def total(self, checkpointing: bool) -> float:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.params + self.grads + self.optimizer + self.ema + self.gathered_params + act

    def as_gib(self, checkpointing: bool) -> dict[str, float]:
        g = 2.0**30
        return {
            "params": self.params / g,
            "grads": self.grads / g,
            "optimizer": self.optimizer / g,
            "ema": self.ema / g,
            "gathered_params": self.gathered_params / g,
            "activations": (self.activations_checkpointed if checkpointing else self.activations) / g,
            "total": self.total(checkpointing) / g,
        }


def state_shards(cfg: JobConfig, gpus: int) -> int:
    """Over how many of ``gpus`` FSDP2 splits the training state: all of them, or a group of
    ``cluster.shard_size`` under HSDP."""
    return min(gpus, cfg.cluster.shard_size or gpus)


def memory_per_gpu(
    cfg: JobConfig, n_params: int, block_params: int, gpus: int, micro_batch: int, act_bytes: int = 2
) -> MemoryEstimate:
    """An FSDP2 estimate for one GPU of ``gpus`` with ``micro_batch`` samples.

    Sharded fp32 state: params, grads, two AdamW moments and the EMA, each 4 bytes / parameter / shards, where
    shards is ``gpus``, or ``cluster.shard_size`` of them under HSDP (replicated across the groups).
    Unsharded: bf16 copies of the block being computed and the one prefetched. Activations: the measured
    saved elements per token per block (at ``act_bytes`` each) over all blocks; with checkpointing only
    each block's two input streams are kept, plus one block's activations during its recompute.
    """
    img, txt = tokens(cfg)
    S, D, d = img + txt, cfg.model.hidden_size, cfg.model.depth
    shard = 4.0 * n_params / state_shards(cfg, gpus)
    per_block_act = SAVED_ELEMENTS_PER_TOKEN_PER_BLOCK * S * D * act_bytes * micro_batch
    return MemoryEstimate(
        params=shard,
        grads=shard,
        optimizer=2 * shard,
        ema=shard,
        gathered_params=2 * 2.0 * block_params,
        activations=d * per_block_act,
        activations_checkpointed=d * S * D * act_bytes * micro_batch + per_block_act,
    )
