"""HSDP (``cluster.shard_size``) over gloo in 4 real processes: FSDP2 on a 2D ("replicate", "shard") mesh
trains exactly like one process on the same global batch, and its checkpoints load under plain FSDP2, in one
process and into the sCD teacher, and the other way round."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Replicate, Shard

from infra.config import load_config
from tests.trainer.conftest import fresh_seed
from tests.trainer.test_distributed import EMPTY, _free_port, _perturb
from trainer import checkpoint, flow
from trainer.loop import Trainer, TrainHooks
from trainer.models.mmdit import canonical_name
from trainer.optim import EMA
from trainer.parallelize import hsdp_mesh
from trainer.recipes.rectified_flow import RectifiedFlowRecipe
from trainer.recipes.scd import SCDRecipe

RANKS = 4
BATCH = 8
# grad_clip well below the gradient norm: every step clips, so the global norm over the 2D mesh matters.
OVERRIDES = ["model.depth=2", "model.head_dim=16", f"train.global_batch_size={BATCH}", "optim.schedule=constant",
             "optim.warmup_steps=0", "optim.grad_clip=0.05", "optim.lr=1e-3", "train.eval_every=0",
             "train.log_every=1", "sample.steps=3", f"cluster.num_workers={RANKS}"]


class GivenNoiseFlow(RectifiedFlowRecipe):
    """Rectified flow with the noise and times carried by the batch: 4 ranks then draw what one process
    draws (the loop's own streams are seeded per rank)."""

    def loss(self, model, batch, streams):
        x0, eps, t = batch["latent"], batch["noise"], batch["t"]
        v = model(flow.interpolate(x0, eps, t), t, batch["text_tokens"], batch["text_pooled"])
        return flow.per_sample_loss(v, x0, eps).mean(), {}


def _batches(seed: int, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"latent": torch.randn(BATCH, 1, 8, 8, generator=g), "noise": torch.randn(BATCH, 1, 8, 8, generator=g),
             "t": torch.rand(BATCH, generator=g), "text_tokens": torch.randn(BATCH, 16, 64, generator=g),
             "text_pooled": torch.randn(BATCH, 64, generator=g)} for _ in range(steps)]


def _local(batches: list[dict]) -> list[dict]:
    """This rank's quarter of each global batch (all of it in one process)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = BATCH // world
    return [{k: v[rank * n:(rank + 1) * n] for k, v in b.items()} for b in batches]


class Record(TrainHooks):
    def __init__(self):
        self.logged: list[dict[str, float]] = []
        self.evaluated: list[tuple[dict[str, float], dict | None]] = []

    def on_log(self, step, metrics):
        self.logged.append(metrics)

    def on_eval(self, step, metrics, images):
        self.evaluated.append((metrics, images))


def _trainer(shard_size: int, steps: int, seed: int) -> Trainer:
    """A fresh trainer; ``seed`` is also validation's and sampling's (the same for all that are compared)."""
    cfg = load_config("demo", OVERRIDES + [f"cluster.shard_size={shard_size}", f"train.steps={steps}",
                                           f"train.seed={seed % 2**31}"])
    trainer = Trainer(cfg, GivenNoiseFlow(cfg, EMPTY), Record())
    _perturb(trainer.model)  # leave adaLN-Zero's identity so every parameter trains
    trainer.ema = EMA(trainer.model, cfg.optim.ema_decay, cfg.optim.ema_warmup)  # of the perturbed weights
    return trainer


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights, EMA and AdamW moments as full tensors, by parameter name."""
    out = {}
    for name, p in trainer.model.named_parameters():
        out[f"model/{name}"] = _full(p)
        out[f"ema/{name}"] = _full(trainer.ema.shadow[name])
        for key, value in trainer.optimizer.state[p].items():
            out[f"adam/{name}/{key}"] = _full(value)
    return out


def _next_loss(trainer: Trainer, batch: dict) -> float:
    """The loss of one more step on ``batch`` (global mean over ranks), the step taken."""
    trainer.cfg.train.steps = trainer.step + 1
    trainer.fit(iter(_local([batch])))
    return trainer.hooks.logged[-1]["loss"]


def _measured(trainer: Trainer, batches: list[dict]) -> tuple[dict, tuple, float]:
    """(state, evaluation, next loss): the full state; the validation losses on ``batches[0]`` and the EMA
    samples for two of its captions (rank 0's; None on the others); the loss of the step then taken on
    ``batches[1]`` (after the EMA weights were swapped in for sampling and out again)."""
    state = _state(trainer)
    trainer.evaluate(_local(batches[:1]), (batches[0]["text_tokens"][:2], batches[0]["text_pooled"][:2]), None)
    metrics, images = trainer.hooks.evaluated[-1]
    return state, (metrics, images and images["samples"]), _next_loss(trainer, batches[1])


def _written(trainer: Trainer, directory: str, batches: list[dict]) -> tuple[dict, tuple, float]:
    checkpoint.save(trainer, directory)
    return _measured(trainer, batches)


def _loaded(trainer: Trainer, directory: str, batches: list[dict]) -> tuple[dict, tuple, float]:
    checkpoint.load(trainer, directory)
    return _measured(trainer, batches)


def _assert_equal_states(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}: {key}"


def _spawn(worker, *args) -> None:
    mp.spawn(worker, args=(_free_port(), *args), nprocs=RANKS, join=True)


def _leave() -> None:
    dist.barrier()  # tear gloo down together (a peer leaving mid-teardown can abort the other)
    dist.destroy_process_group()
    os._exit(0)  # in the full suite a rank sometimes aborted at interpreter exit, results already written


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(1)


# ---- training ---------------------------------------------------------------------------------------


def _train_worker(rank: int, port: int, seed: int, out: str) -> None:
    _init(rank, port)
    # A job launched on another number of ranks than its config says (torchrun) is told what to change.
    odd = load_config("demo", OVERRIDES + ["cluster.num_workers=3", "cluster.shard_size=3"])
    with pytest.raises(ValueError, match="cluster.shard_size=3 does not divide the 4 ranks"):
        hsdp_mesh(odd)
    results = {}
    for shard_size in (2, 1):  # 2 x 2, and 4 x 1 (replicated, a shard group of one rank)
        trainer = _trainer(shard_size, steps=3, seed=seed)
        p = next(iter(trainer.model.parameters()))
        assert p.device_mesh.mesh_dim_names == ("replicate", "shard"), p.device_mesh
        assert tuple(p.device_mesh.shape) == (RANKS // shard_size, shard_size)
        assert p.placements == (Replicate(), Shard(0))
        trainer.fit(iter(_local(_batches(seed, 3))))
        results[shard_size] = {"state": _state(trainer), "logged": trainer.hooks.logged}
    if rank == 0:
        torch.save(results, out)
    _leave()


def test_hsdp_training_steps_equal_one_process_on_the_global_batch():
    seed = fresh_seed()
    reference = _trainer(0, steps=3, seed=seed)
    reference.fit(iter(_batches(seed, 3)))
    want = _state(reference)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        _spawn(_train_worker, seed, out)
        results = torch.load(out, weights_only=True)
    for shard_size, got in results.items():
        assert got["state"].keys() == want.keys()
        for key, value in want.items():
            # Tolerances relative to each tensor's scale (weights, AdamW's second moments differ by 1e6).
            atol = 1e-5 * float(value.abs().max())
            torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=atol,
                                       msg=lambda m: f"shard_size={shard_size} {key} (seed {seed}): {m}")
        for step, (g, w) in enumerate(zip(got["logged"], reference.hooks.logged)):
            # grad_norm is before clipping: a wrong divide factor (averaged over 2 ranks, or twice) scales it.
            for metric in ("loss", "grad_norm"):
                assert abs(g[metric] - w[metric]) <= 1e-5 * abs(w[metric]), (shard_size, step, metric, seed)


# ---- checkpoints ---------------------------------------------------------------------------------------


def _checkpoint_worker(rank: int, port: int, seed: int, tmp: str) -> None:
    """HSDP validates and writes A; plain FSDP2 loads A, steps, writes B; HSDP loads B; each measured as it is
    written and loaded; the sCD teacher loads A under HSDP. Rank 0 records it all for the parent to compare."""
    _init(rank, port)
    batches = _batches(seed, 4)
    record = {}

    a, b = os.path.join(tmp, "A"), os.path.join(tmp, "B")
    hsdp = _trainer(2, steps=2, seed=seed)
    hsdp.fit(iter(_local(batches[:2])), val_batches=_local(batches[:1]))  # validates at its last step
    record["A"] = _written(hsdp, a, batches[1:3])
    plain = _trainer(0, steps=2, seed=seed)
    record["A in plain FSDP2"] = _loaded(plain, a, batches[1:3])
    record["B"] = _written(plain, b, batches[2:4])
    record["B in HSDP"] = _loaded(_trainer(2, steps=2, seed=seed), b, batches[2:4])

    cfg = load_config("demo", OVERRIDES + ["cluster.shard_size=2", f"distill.teacher={tmp}/A"])
    recipe = SCDRecipe(cfg, EMPTY)
    student = Trainer(cfg, recipe).model
    for p in [*student.parameters(), *recipe.teacher.net.parameters()]:
        assert isinstance(p, DTensor) and p.device_mesh.shape == (2, 2)
    record["teacher"] = {canonical_name(n): _full(p) for n, p in recipe.teacher.net.named_parameters()}
    record["student"] = {canonical_name(n): _full(p) for n, p in student.net.named_parameters()}
    if rank == 0:
        torch.save(record, os.path.join(tmp, "record.pt"))
    _leave()


def test_checkpoints_move_between_hsdp_plain_fsdp2_and_one_process():
    seed = fresh_seed()
    batches = _batches(seed, 4)
    with tempfile.TemporaryDirectory() as tmp:
        _spawn(_checkpoint_worker, seed, tmp)
        record = torch.load(os.path.join(tmp, "record.pt"), weights_only=True)
        # HSDP -> plain FSDP2 on the same ranks, and back: the same numbers, bit for bit.
        for written, loaded in (("A", "A in plain FSDP2"), ("B", "B in HSDP")):
            (state, evaluation, loss), want = record[loaded], record[written]
            _assert_equal_states(state, want[0], loaded)
            assert evaluation[0] == want[1][0] and torch.equal(evaluation[1], want[1][1]), loaded
            assert loss == want[2], loaded
        # Either, in one process: the same weights and state; samples and loss up to the summation order. (Not
        # the validation losses: each rank draws validation noise for its own slice, so they depend on the
        # number of ranks.)
        for name, part in (("A", batches[1:3]), ("B", batches[2:4])):
            single = _trainer(0, steps=2, seed=seed)
            state, (_, samples), loss = _loaded(single, os.path.join(tmp, name), part)
            want = record[name]
            _assert_equal_states(state, want[0], f"{name} in one process")
            torch.testing.assert_close(samples, want[1][1], rtol=1e-4, atol=1e-5)
            assert abs(loss - want[2]) <= 1e-5 * abs(want[2]), (name, seed)
    # The sCD teacher loads an HSDP checkpoint's EMA under HSDP, and the student starts from it.
    ema = {canonical_name(k.removeprefix("ema/")): v for k, v in record["A"][0].items()
           if k.startswith("ema/")}
    assert record["teacher"].keys() == ema.keys()
    for name, value in ema.items():
        assert torch.equal(record["teacher"][name], value), name
        if name in record["student"]:
            assert torch.equal(record["student"][name], value), name
