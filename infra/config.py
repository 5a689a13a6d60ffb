"""The one config system of flowscale: typed sections, YAML presets, dotted overrides.

A job's config is a tree of pydantic models (``JobConfig``). It is built from a YAML preset (which may
name a ``base:`` preset it extends) plus ``section.key=value`` overrides from the command line, then
validated as a whole. Every unknown or misspelled key is an error that names the dotted key and the
closest valid ones; every bad value names its key. The fully resolved config is what gets saved with a
run and logged to MLflow (``dump_config``).

This module sits at the bottom of the layering: it imports nothing from the rest of the project.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO_ROOT / "configs"


def flowscale_home() -> Path:
    """Where flowscale keeps things on this machine when the config does not say (demo data, local runs,
    caches, the local stack): ``FLOWSCALE_HOME``, by default ``~/flowscale``."""
    return Path(os.environ.get("FLOWSCALE_HOME", Path.home() / "flowscale")).expanduser()


class ConfigError(ValueError):
    """A config that cannot be used: the message says which key, which value and what to do."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class ModelConfig(Section):
    """The MM-DiT (SD3 sizing: hidden = head_dim * depth, depth heads)."""

    depth: int = Field(24, ge=1, description="d: joint blocks and attention heads; hidden = head_dim * d")
    head_dim: int = Field(64, ge=8, description="per-head width (64 in SD3)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width over model width")
    in_channels: int = Field(16, ge=1, description="latent channels in (16 for the SD3 VAE)")
    out_channels: int = Field(16, ge=1, description="channels predicted (velocity), usually = in_channels")
    patch_size: int = Field(2, ge=1, description="square patch side of the Conv2d patchifier")
    pooled_dim: int = Field(2048, ge=1, description="pooled text embedding width (CLIP-L + CLIP-G = 2048)")
    context_dim: int = Field(4096, ge=1, description="text token width (T5-XXL = 4096)")
    pos_embed_max_size: int = Field(192, ge=1, description="side of the 2D sin-cos table, in patches")
    time_scale: float = Field(
        1000.0, gt=0, description="network sees time_scale * t; sCD differentiates through it"
    )
    time_freq_dim: int = Field(256, ge=2, description="sinusoidal width of the timestep embedding")
    qkv_bias: bool = Field(True, description="bias on the qkv projections (SD3: on)")
    qk_norm: bool = Field(True, description="per-head RMSNorm on q and k (SD3 8B: on; stabilises bf16)")
    guidance_embed: bool = Field(
        False, description="zero-initialised CFG-scale embedding added to c (sCD student with sampled w)"
    )

    @property
    def hidden_size(self) -> int:
        return self.head_dim * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth

    @model_validator(mode="after")
    def _even_freq(self) -> "ModelConfig":
        if self.time_freq_dim % 2:
            raise ValueError(f"model.time_freq_dim must be even, got {self.time_freq_dim}")
        return self


class FlowConfig(Section):
    """The rectified-flow objective (SD3 section 3)."""

    timestep_sampler: Literal["logit_normal", "mode", "cosmap", "uniform"] = Field(
        "logit_normal", description="training-time density of t (SD3 ranks logit_normal(0, 1) best)"
    )
    logit_mean: float = Field(0.0, description="m of logit-normal(m, s); m < 0 favours data, m > 0 noise")
    logit_std: float = Field(1.0, gt=0, description="s of logit-normal(m, s)")
    mode_scale: float = Field(1.29, description="s of mode-with-heavy-tails; valid in [-1, 2/(pi-2)]")
    shift: float = Field(1.0, gt=0, description="resolution shift alpha applied to training timesteps")
    text_dropout: float = Field(
        0.1, ge=0, le=1, description="per-sample probability of replacing the text with the empty caption"
    )

    @model_validator(mode="after")
    def _mode_range(self) -> "FlowConfig":
        hi = 2.0 / (math.pi - 2.0)
        if self.timestep_sampler == "mode" and not (-1.0 <= self.mode_scale <= hi):
            raise ValueError(
                f"flow.mode_scale={self.mode_scale} is outside [-1, {hi:.4f}] where the mode map is monotone"
            )
        return self


class OptimConfig(Section):
    """AdamW with linear warmup and a decay schedule."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (not on norms/biases)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="decay after warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the peak")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA of the weights used for sampling")
    ema_warmup: bool = Field(True, description="use min(decay, (1+n)/(10+n)) so early EMA tracks the model")


class DataConfig(Section):
    """Where batches come from (Arrow shards; see dataloaders/)."""

    url: str = Field("", description="manifest URL of the dataset (any fsspec URL; empty = job default)")
    resolution: int = Field(256, ge=1, description="pixel resolution the latents come from (for FLOPs)")
    latent_size: int = Field(32, ge=1, description="latent side (H = W) fed to the model")
    text_tokens: int = Field(154, ge=1, description="text sequence length (77 CLIP + 77 T5 in SD3)")
    shuffle: bool = Field(True, description="deterministic shard + block shuffling, seeded by seed and epoch")
    shuffle_block_size: int = Field(4096, ge=1, description="samples per shuffle block of each partition")
    partitions: int = Field(
        0, ge=0, description="fixed data partitions (0 = the first run's node count); a node reads 1/nodes of the "
                             "data per epoch when its node count divides this, so set it to allow other node counts"
    )
    num_workers: int = Field(
        2, ge=0, description="loader processes per rank that fetch the coming record batches into the node cache "
        "(forkserver); the rank builds its batches itself; 0 = the rank's fetch threads only"
    )
    prefetch: int = Field(4, ge=0, description="batches the rank fetches for itself ahead once its workers run")
    cache_dir: str = Field("", description="local shard cache directory; empty disables the cache")
    cache_bytes: int = Field(0, ge=0, description="byte budget of the local cache (0 = unbounded)")
    on_corrupt: Literal["fail", "skip"] = Field("fail", description="what to do with a corrupt shard")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options")
    retries: int = Field(5, ge=0, description="retries with backoff of a failed shard read before the job fails")
    timeout_s: float = Field(30.0, gt=0, description="seconds an S3 request may stall before it is retried")
    fetch_threads: int = Field(8, ge=1, description="concurrent shard fetches per worker (more hides more latency)")
    verify_checksums: bool = Field(True, description="check each shard's checksum (CRC32, ~4.5 GB/s per core) before use")


class TrainConfig(Section):
    """The training loop."""

    steps: int = Field(1000, ge=1, description="optimizer steps")
    global_batch_size: int = Field(256, ge=1, description="samples per step over all ranks")
    seed: int = Field(0, description="seeds init, data order and the per-rank noise/timestep streams")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast on CUDA with bf16 support, fp32 elsewhere"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    eval_every: int = Field(500, ge=0, description="steps between sample grids (and validation); 0 = end only")
    val_every: int = Field(
        0, ge=0, description="steps between validation losses alone (cheap: no sampling); 0 = at eval_every only"
    )
    val_batches: int = Field(2, ge=0, description="batches of the fixed validation set")
    record_sample_ids: str = Field(
        "", description="debugging data order: a local directory where each rank appends the sample ids it trains "
        "on at each step (rank_NNNNN.jsonl); empty = off"
    )
    val_timesteps: list[float] = Field(
        [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875],
        description="fixed t values of the validation loss (one bucket each)",
    )
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward")
    compile: bool = Field(
        False, description="torch.compile each joint block (sCD: with distill.jvp_pass fused or separate, not forward_ad)"
    )
    max_nonfinite_steps: int = Field(
        20, ge=1, description="consecutive non-finite steps that stop the job"
    )
    peak_tflops: float = Field(
        0.0, ge=0, description="device peak for MFU; 0 = known GPU table (989 for H100/H200 bf16)"
    )

    @model_validator(mode="after")
    def _timesteps_in_range(self) -> "TrainConfig":
        bad = [t for t in self.val_timesteps if not 0.0 <= t <= 1.0]
        if bad:
            raise ValueError(f"train.val_timesteps must lie in [0, 1], got {bad}")
        return self


class TuneConfig(Section):
    """A Ray Tune sweep over this job (orchestration/tune.py): each trial runs the job with sampled values.

    ``space`` maps a dotted config key to a distribution, ``{choice: [...]}``, ``{grid: [...]}``,
    ``{uniform: [lo, hi]}`` or ``{loguniform: [lo, hi]}``. An entry whose options are mappings (under any
    label, e.g. ``sampler``) picks a whole set of overrides per trial, and those may nest distributions
    (``search: optuna`` samples them conditionally)."""

    metric: str = Field("val/loss", description="the reported metric trials are ranked by (quality/NAME, val/loss)")
    mode: Literal["min", "max"] = Field("min", description="whether lower or higher metric is better")
    space: dict[str, dict[str, Any]] = Field(default_factory=dict, description="dotted key -> distribution")
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of grid entries; random; optuna: TPE (conditional spaces)"
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="known configurations tried first (optuna), as dotted-key mappings"
    )
    num_samples: int = Field(1, ge=1, description="trials (grid: repeats of the whole grid)")
    scheduler: Literal["asha", "none"] = Field("asha", description="ASHA stops weak trials early; none = run all out")
    grace_period: int = Field(0, ge=0, description="steps before ASHA may stop a trial; 0 = train.eval_every")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of trials go on at each rung")
    max_concurrent_trials: int = Field(
        0, ge=0, description="trials at once; 0 = what the cluster's CPUs/GPUs fit of one trial's workers"
    )
    seed: int = Field(0, description="seed of the search algorithm")


class SampleConfig(Section):
    """Euler sampling for evaluation grids."""

    steps: int = Field(28, ge=1, description="Euler steps")
    cfg: float = Field(5.0, ge=0, description="classifier-free guidance weight w")
    shift: float = Field(1.0, gt=0, description="sigma-grid shift (SD3 uses 3.0 at 1024^2)")
    prompts: list[str] = Field(default_factory=list, description="captions of the evaluation grid")
    num_per_prompt: int = Field(4, ge=1, description="samples per prompt in the grid")
    quality: Literal["", "digits"] = Field(
        "", description="score each evaluation grid (quality/NAME metrics): digits = Frechet distance to the real "
        "digits in a small classifier's features (the demo); empty = none"
    )


class CheckpointConfig(Section):
    """Sharded DCP checkpoints of the whole training state."""

    every: int = Field(500, ge=0, description="steps between checkpoints; 0 = only at the end")
    keep: int = Field(3, ge=1, description="checkpoints kept (older ones are deleted by Ray Train)")


class ClusterConfig(Section):
    """The Ray Train worker group."""

    num_workers: int = Field(2, ge=1, description="data-parallel workers (one process each)")
    use_gpu: bool = Field(False, description="one GPU per worker and NCCL; False = CPU workers and gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint; -1 = forever")
    poll_interval_s: float = Field(
        0.5, gt=0, le=60, description="seconds between the Ray Train controller's polls of the workers "
        "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2). A worker's report waits until the previous "
        "one has been polled, so reports closer together than this stall training"
    )
    shard_size: int = Field(
        0, ge=0, description="HSDP: shard parameters within groups of this many ranks (a node) and replicate "
        "across groups; 0 = shard over all ranks (plain FSDP2). Must divide num_workers"
    )

    @model_validator(mode="after")
    def _shard_size_divides(self) -> "ClusterConfig":
        if self.shard_size and self.num_workers % self.shard_size:
            raise ValueError(
                f"cluster.shard_size={self.shard_size} must divide cluster.num_workers={self.num_workers}"
            )
        return self


class RunStorageConfig(Section):
    """Where a run lives (checkpoints, resolved config, sample grids)."""

    name: str = Field("", description="run name; relaunching with the same name resumes it. Empty = generated")
    storage_path: str = Field("", description="local directory or s3://bucket/prefix; empty = ./runs")
    s3_endpoint: str = Field("", description="S3-compatible endpoint URL for s3:// storage (else AWS_ENDPOINT_URL)")
    cache_dir: str = Field(
        "", description="node-local directory where remote checkpoints (teachers) are fetched once; empty = "
        "FLOWSCALE_HOME/cache"
    )


class TrackingConfig(Section):
    """MLflow tracking (rank 0 only, never blocking training)."""

    enabled: bool = Field(True, description="log params, metrics, grids and checkpoint URIs to MLflow")
    tracking_uri: str = Field(
        "", description="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else a sqlite file beside the runs"
    )
    experiment: str = Field("", description="MLflow experiment; empty = the config's name")
    system_metrics: bool = Field(True, description="log CPU/GPU/memory system metrics with the run")


class DistillConfig(Section):
    """Continuous-time consistency distillation (sCD) or training (sCT) in TrigFlow (docs: SCD.md)."""

    mode: Literal["scd", "sct"] = Field(
        "scd", description="scd = tangent from a frozen teacher's ODE; sct = from the noise-data pair (no teacher)"
    )
    teacher: str = Field(
        "", description="pretraining checkpoint directory whose EMA weights are the teacher and the student's init"
    )
    sigma_d: float = Field(0.5, gt=0, description="TrigFlow data std: x0 = sigma_d * latents, z ~ N(0, sigma_d^2)")
    p_mean: float = Field(-0.8, description="training tau = arctan(exp(p_mean + p_std n) / sigma_d)")
    p_std: float = Field(1.6, gt=0, description="spread of log(sigma_d tan tau); larger = more extreme times")
    guidance: Literal["fixed", "sampled"] = Field(
        "fixed", description="teacher CFG w: fixed cfg_scale, or per sample in [cfg_min, cfg_max], fed to the student"
    )
    cfg_scale: float = Field(2.0, ge=0, description="teacher CFG w when fixed; the student's default w when sampled")
    cfg_min: float = Field(1.0, ge=0, description="lowest w drawn per sample when guidance = sampled")
    cfg_max: float = Field(4.0, ge=0, description="highest w drawn per sample when guidance = sampled")
    tangent_warmup: Literal["linear", "cosine", "none"] = Field(
        "linear", description="shape of r: 0 -> 1 over tangent_warmup_steps (none = r = 1 from the start)"
    )
    tangent_warmup_steps: int = Field(1000, ge=0, description="steps until r = 1 (paper 10k, Sana-Sprint 4k, rCM 1k)")
    tangent_norm_eps: float = Field(0.1, gt=0, description="c in g / (||g|| + c): bounds the tangent per sample")
    weighting: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive = lambda(tau) e^-u mse + u with a learned log-variance u; fixed = plain mse"
    )
    jvp_pass: Literal["auto", "fused", "separate", "forward_ad"] = Field(
        "auto",
        description=(
            "fused = one with-grad pass carries the tangent too (cheapest); separate = a no-grad tangent pass, then "
            "the with-grad pass; forward_ad = torch.func.jvp, then the with-grad pass (the reference, slowest). F^- "
            "is stop-grad F of the with-grad pass in all three. auto = fused (as exact in fp32 and bf16: "
            "docs/PERFORMANCE.md)"
        ),
    )
    tangent_precision: Literal["fp32", "tf32", "bf16"] = Field(
        "bf16",
        description=(
            "matmuls of the JVP tangent under bf16 autocast: fp32 (SCD.md; several times the cost of bf16 on a "
            "GPU), tf32 (fp32 with TF32 matmuls on CUDA), bf16 (bf16 operands, fp32 accumulation; the tangent "
            "stays fp32 between layers; as exact as fp32 in docs/PERFORMANCE.md). fp32 training keeps it fp32"
        ),
    )
    t_max: float | None = Field(
        None, gt=0, le=math.pi / 2, description="largest tau (training clamp, 1-step start); None = arctan(80/sigma_d)"
    )
    sample_mid_times: list[float] = Field(
        [1.1], description="intermediate taus of the multi-step sampler (2 steps uses the first; sCM: 1.1)"
    )

    @property
    def tau_max(self) -> float:
        return self.t_max if self.t_max is not None else math.atan(80.0 / self.sigma_d)

    @model_validator(mode="after")
    def _ranges(self) -> "DistillConfig":
        if self.cfg_min > self.cfg_max:
            raise ValueError(f"distill.cfg_min={self.cfg_min} is above distill.cfg_max={self.cfg_max}")
        bad = [t for t in self.sample_mid_times if not 0.0 < t < math.pi / 2]
        if bad:
            raise ValueError(f"distill.sample_mid_times must lie in (0, pi/2), got {bad}")
        return self


class JobConfig(Section):
    """A whole job."""

    name: str = Field("flowscale", description="experiment name (MLflow experiment, run-name prefix)")
    recipe: str = Field(
        "rectified_flow", description="the train spec by name (trainer.recipes): rectified_flow (pretraining) or scd"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    run: RunStorageConfig = Field(default_factory=RunStorageConfig)
    mlflow: TrackingConfig = Field(default_factory=TrackingConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _grid_fits(self) -> "JobConfig":
        m, d = self.model, self.data
        if d.latent_size % m.patch_size:
            raise ValueError(
                f"data.latent_size={d.latent_size} is not divisible by model.patch_size={m.patch_size}"
            )
        if d.latent_size // m.patch_size > m.pos_embed_max_size:
            raise ValueError(
                f"data.latent_size={d.latent_size} gives a {d.latent_size // m.patch_size}-patch grid, larger "
                f"than model.pos_embed_max_size={m.pos_embed_max_size}"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# --------------------------------------------------------------------------------------------------


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def all_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config schema, e.g. ``model.depth``."""
    keys = []
    for name, info in model.model_fields.items():
        sub = _section_type(info.annotation)
        if sub is not None:
            keys.extend(all_keys(sub, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _suggest(key: str, model: type[BaseModel], prefix: str) -> str:
    local = difflib.get_close_matches(key.rsplit(".", 1)[-1], _field_names(model), n=3, cutoff=0.5)
    everywhere = difflib.get_close_matches(prefix + key, all_keys(), n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf]
    options = [f"{prefix}{k}" for k in local] + everywhere + same_leaf
    seen: list[str] = []
    for o in options:
        if o not in seen and o != prefix + key:
            seen.append(o)
    return f"; did you mean {', '.join(seen[:4])}?" if seen else ""


def check_keys(data: dict, model: type[BaseModel] = JobConfig, prefix: str = "", source: str = "") -> None:
    """Raise ConfigError for the first key that the schema does not have, with the closest valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    for key, value in data.items():
        if key not in model.model_fields:
            raise ConfigError(f"{source}unknown config key '{prefix}{key}'{_suggest(str(key), model, prefix)}")
        sub = _section_type(model.model_fields[key].annotation)
        if sub is not None and value is not None:
            check_keys(value, sub, f"{prefix}{key}.", source)


def _resolve_preset(name: str | Path) -> Path:
    p = Path(name)
    candidates = [p, PRESET_DIR / p, PRESET_DIR / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config preset '{name}' not found (looked in {PRESET_DIR}); presets: {available}")


# Mappings whose entries are whole values: a preset replaces an entry of its base rather than merging into it
# (a sweep preset that turns the base's `sampler: {choice: ...}` into `sampler: {grid: ...}`).
_WHOLE_ENTRIES = {("tune", "space")}


def _deep_merge(base: dict, top: dict, path: tuple[str, ...] = ()) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and path not in _WHOLE_ENTRIES:
            out[k] = _deep_merge(out[k], v, path + (k,))
        else:
            out[k] = v
    return out


def read_preset(name: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a YAML preset, with its ``base:`` chain merged underneath it."""
    path = _resolve_preset(name).resolve()
    if path in _seen:
        raise ConfigError(f"config preset {path} extends itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    base = data.pop("base", None)
    check_keys(data, source=f"{path}: ")
    if base is not None:
        base_path = path.parent / base if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            base_path = _resolve_preset(base)
        data = _deep_merge(read_preset(base_path, _seen + (path,)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.depth=38`` -> (['model', 'depth'], 38). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = _deep_merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node: dict = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
        node[path[-1]] = value
        check_keys(out, source=f"override '{text}': ")
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {e['msg']}{shown}")
    return f"invalid config{source}:\n" + "\n".join(lines)


def build_config(data: dict, source: str = "") -> JobConfig:
    check_keys(data, source=f"{source}: " if source else "")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, f" from {source}" if source else "")) from None


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """A validated JobConfig from a preset name or YAML path plus dotted ``key=value`` overrides."""
    data = read_preset(preset) if preset is not None else {}
    data = apply_overrides(data, list(overrides))
    return build_config(data, source=str(preset) if preset is not None else "defaults")


SECRET_NAME = re.compile(r"^(key|token)$|secret|password|passwd|credential|access_key|key_id|_token$")


def is_secret(key: str) -> bool:
    """Whether a config key holds a credential. s3fs takes them as ``key``/``secret``/``token`` in storage
    options; other clients say ``aws_secret_access_key``, ``session_token`` and so on."""
    return bool(SECRET_NAME.search(key.rsplit(".", 1)[-1].lower()))


# The user-info part of a URL: scheme://user:password@host or scheme://token@host.
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """``text`` with the user-info of every URL in it (``user:password@``) replaced by ``***@``: what is
    recorded or printed never carries a password, while the running job keeps using the real value."""
    return URL_USERINFO.sub(r"\g<scheme>***@", text)


def _public(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _public(v) for k, v in node.items() if not is_secret(str(k))}
    if isinstance(node, list):
        return [_public(v) for v in node]
    if isinstance(node, str):
        return redact_url(node)
    return node


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (what is saved with every run), without credentials (secret keys
    dropped, passwords in URLs redacted): those come from the environment (AWS variables, profiles,
    MLFLOW_TRACKING_PASSWORD) wherever the run is resumed or sampled."""
    return yaml.safe_dump(_public(cfg.model_dump(mode="json")), sort_keys=False)


def flat_params(cfg: BaseModel) -> dict[str, str]:
    """The resolved config as flat ``section.key -> str`` pairs (MLflow params), without credentials."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = str(node)

    walk(_public(cfg.model_dump(mode="json")), "")
    return out
