"""What a configuration costs: parameters, training FLOPs (stream-aware), FSDP2/HSDP memory and communication
per GPU, and the step time and data rate at a given MFU."""

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


def shard_group(gpus: int, shard_size: int = 0) -> int:
    """The ranks the training state is sharded over: all ``gpus`` under plain FSDP2 (``shard_size`` 0), else
    ``shard_size`` (HSDP, cluster.shard_size), which must divide ``gpus``."""
    if shard_size < 0 or (shard_size and gpus % shard_size):
        raise ValueError(f"a shard group of {shard_size} ranks does not divide {gpus} GPUs")
    return shard_size or gpus


def memory_per_gpu(
    cfg: JobConfig, n_params: int, block_params: int, gpus: int, micro_batch: int, act_bytes: int = 2,
    shard_size: int = 0,
) -> MemoryEstimate:
    """An FSDP2 estimate for one GPU of ``gpus`` with ``micro_batch`` samples.

    Sharded fp32 state: params, grads, two AdamW moments and the EMA, each 4 bytes / parameter over the shard
    group: all ``gpus``, or ``shard_size`` of them under HSDP, whose replicas each hold a whole copy of the
    state (so adding nodes no longer shrinks it). Unsharded: bf16 copies of the block being computed and the
    one prefetched. Activations: the measured saved elements per token per block (at ``act_bytes`` each) over
    all blocks; with checkpointing only each block's two input streams are kept, plus one block's activations
    during its recompute.
    """
    img, txt = tokens(cfg)
    S, D, d = img + txt, cfg.model.hidden_size, cfg.model.depth
    shard = 4.0 * n_params / shard_group(gpus, shard_size)
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


def communication_per_step(n_params: int, gpus: int, shard_size: int = 0) -> dict[str, float]:
    """Bytes one GPU sends per optimizer step (ring collectives, ``(n - 1) / n`` of the data each).

    ``shard``: within the shard group, the bf16 all-gather of every block in forward and again in backward
    (blocks reshard after forward) and the fp32 reduce-scatter of the gradients (trainer/parallelize.py's
    MixedPrecisionPolicy). ``replicate``: under HSDP, the all-reduce of each gradient shard across the
    replicas; none under plain FSDP2."""
    group = shard_group(gpus, shard_size)
    replicas = gpus // group
    gathered_and_reduced = (2 * 2.0 + 4.0) * n_params * (group - 1) / group
    grad_shard = 4.0 * n_params / group
    return {"shard": gathered_and_reduced, "replicate": 2.0 * grad_shard * (replicas - 1) / replicas}


def sample_bytes(cfg: JobConfig) -> int:
    """Bytes of one stored training sample: the bf16 latent, text tokens and pooled text vector (the shards'
    layout, dataloaders/writer.py; the caption and id are a few dozen bytes more)."""
    m, d = cfg.model, cfg.data
    return 2 * (m.in_channels * d.latent_size**2 + d.text_tokens * m.context_dim + m.pooled_dim)


def step_seconds(flops_per_sample: float, global_batch: int, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Seconds per optimizer step when every GPU runs at ``mfu`` of its dense peak."""
    return global_batch * flops_per_sample / (gpus * peak_tflops * 1e12 * mfu)
