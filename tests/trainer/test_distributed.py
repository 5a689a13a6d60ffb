"""FSDP2 over gloo in real processes: gradients equal a 1-process run (pytorch#162338), sharded init
equals unsharded init, and a checkpoint written by 2 ranks resumes on 1 (DCP resharding)."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infra.config import load_config
from trainer import checkpoint
from trainer.loop import Trainer
from trainer.models.mmdit import build_mmdit
from trainer.parallelize import materialize, parallelize
from trainer.recipes.rectified_flow import RectifiedFlowRecipe

OVERRIDES = ["model.depth=2", "model.head_dim=16", "train.global_batch_size=8", "optim.schedule=constant",
             "optim.warmup_steps=0", "train.eval_every=0", "train.log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), torch.randn(n, 16, 64, generator=g),
            torch.randn(n, 64, generator=g), torch.randn(n, 1, 8, 8, generator=g))


def _batches(seed: int, steps: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [{"latent": torch.randn(n, 1, 8, 8, generator=g), "text_tokens": torch.randn(n, 16, 64, generator=g),
             "text_pooled": torch.randn(n, 64, generator=g)} for _ in range(steps)]


EMPTY = {"text_tokens": torch.zeros(16, 64), "text_pooled": torch.zeros(64)}


def _perturb(model):
    """Leave adaLN-Zero's identity so every parameter gets a gradient."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(len(name))
            full = torch.randn(p.shape, generator=gen) * 0.05
            if hasattr(p, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                p.to_local().add_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.add_(full)


def _grad_worker(rank: int, world: int, port: int, seed: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config("demo", OVERRIDES)
    model = materialize(parallelize(RectifiedFlowRecipe(cfg, EMPTY).build_model(), cfg, None), torch.device("cpu"), 0)
    _perturb(model)
    x, t, ctx, pooled, target = _inputs(seed)
    half = slice(rank * 4, rank * 4 + 4)
    loss = (model(x[half], t[half], ctx[half], pooled[half]) - target[half]).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()  # tear gloo down together (a peer leaving mid-teardown can abort the other)
    dist.destroy_process_group()
    os._exit(0)  # in the full suite a rank sometimes aborted at interpreter exit, results already written


def test_two_rank_fsdp2_gradients_equal_one_process_gradients():
    seed = int.from_bytes(os.urandom(4), "little")
    cfg = load_config("demo", OVERRIDES)
    model = build_mmdit(cfg.model, seed=0)
    _perturb(model)
    x, t, ctx, pooled, target = _inputs(seed)
    (model(x, t, ctx, pooled) - target).pow(2).mean().backward()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.pt")
        mp.spawn(_grad_worker, args=(2, _free_port(), seed, out), nprocs=2, join=True)
        sharded = torch.load(out, weights_only=True)
    for name, p in model.named_parameters():
        # Averaged, not summed: a summed gradient would be exactly 2x (the gloo AVG bug).
        torch.testing.assert_close(sharded[name], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} (seed {seed}): {m}")


def _train_worker(rank: int, world: int, port: int, directory: str, steps: int, save_at: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # Validation alone at the save step: a forward without backward must not leave FSDP2's unsharded
    # parameters in place of the sharded ones the optimizer holds when the checkpoint is written.
    cfg = load_config("demo", OVERRIDES + [f"train.steps={steps}", f"train.val_every={save_at}", "train.val_batches=1"])

    class SaveAt:
        def on_log(self, *a): ...
        def on_eval(self, *a): ...
        def should_checkpoint(self, step, final): return step == save_at
        def on_checkpoint(self, step, trainer):
            checkpoint.save(trainer, directory, {"samples_seen": step * 8})
            full = {n: p.full_tensor() for n, p in trainer.model.named_parameters()}
            ema = {n: t.full_tensor() for n, t in trainer.ema.shadow.items()}
            if rank == 0:
                torch.save({"model": full, "ema": ema}, os.path.join(directory, "reference.pt"))

    trainer = Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY), SaveAt())
    local = [{k: v[rank * 4:(rank + 1) * 4] for k, v in b.items()} for b in _batches(1, steps)]
    trainer.fit(iter(local), val_batches=local[:1])
    dist.barrier()  # tear gloo down together (a peer leaving mid-teardown can abort the other)
    dist.destroy_process_group()
    os._exit(0)  # in the full suite a rank sometimes aborted at interpreter exit, results already written


def test_checkpoint_from_two_fsdp2_ranks_resumes_in_one_process():
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_train_worker, args=(2, _free_port(), directory, 6, 3), nprocs=2, join=True)
        cfg = load_config("demo", OVERRIDES + ["train.steps=6"])
        resumed = Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY))
        state = checkpoint.load(resumed, directory)
        assert state == {"samples_seen": 24} and resumed.step == 3
        reference = torch.load(os.path.join(directory, "reference.pt"), weights_only=True)
        for name, p in resumed.model.named_parameters():
            assert torch.equal(p, reference["model"][name]), name
            assert torch.equal(resumed.ema.shadow[name], reference["ema"][name]), name
        adam = resumed.optimizer.state[next(iter(resumed.model.parameters()))]
        assert int(adam["step"]) == 3 and float(adam["exp_avg_sq"].abs().sum()) > 0
        resumed.fit(iter(_batches(1, 6)[3:]))
        assert resumed.step == 6


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / ".metadata").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete.*COMPLETE"):
        checkpoint.check_complete(tmp_path)


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    """DCP's metadata is a pickle; loading must not execute what a tampered file asks for."""
    import pickle

    cfg = load_config("demo", OVERRIDES + ["train.steps=1"])
    trainer = Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY))
    checkpoint.save(trainer, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(checkpoint.CheckpointError, match="posix.system|os.system"):
        checkpoint.load(Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY)), tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing"):
        checkpoint.load_weights(RectifiedFlowRecipe(cfg, EMPTY).build_model().to_empty(device="cpu"), tmp_path)
    assert not marker.exists()
