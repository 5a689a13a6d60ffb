"""The sCD recipe (SCD.md section 3): the student starts as its teacher, the objective's guards and bf16
behaviour at the ends of [0, pi/2], activation checkpointing under the JVP pass, sCT without a teacher,
sampling and config errors."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import kernels
from infra.config import dump_config, load_config
from tests.trainer.conftest import fresh_seed
from trainer import checkpoint, trigflow
from trainer.loop import Trainer
from trainer.models.mmdit import build_mmdit
from trainer.parallelize import materialize, parallelize
from trainer.recipes.rectified_flow import RectifiedFlowRecipe
from trainer.recipes.scd import SCDRecipe

TINY = ["model.depth=2", "model.head_dim=16", "train.global_batch_size=8", "optim.warmup_steps=0",
        "optim.schedule=constant", "train.eval_every=0", "train.log_every=1"]
EMPTY = {"text_tokens": torch.zeros(16, 64), "text_pooled": torch.zeros(64)}


def _batch(gen: torch.Generator, n: int = 8) -> dict:
    return {"latent": torch.randn(n, 1, 8, 8, generator=gen), "text_tokens": torch.randn(n, 16, 64, generator=gen),
            "text_pooled": torch.randn(n, 64, generator=gen)}


def _write_teacher(directory, seed: int, overrides=()) -> None:
    """A pretraining checkpoint whose EMA weights are the init plus seeded noise (a non-trivial teacher)."""
    cfg = load_config("demo", TINY + list(overrides))
    trainer = Trainer(cfg, RectifiedFlowRecipe(cfg, EMPTY))
    with torch.no_grad():
        for name, shadow in trainer.ema.shadow.items():
            gen = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
            shadow.add_(torch.randn(shadow.shape, generator=gen) * 0.05)
    checkpoint.save(trainer, directory, config_yaml=dump_config(cfg))


@pytest.fixture(scope="module")
def teacher_seed() -> int:
    return fresh_seed() % 2**31


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, teacher_seed) -> str:
    directory = tmp_path_factory.mktemp("teacher")
    _write_teacher(directory, teacher_seed)
    return str(directory)


def _recipe_and_student(teacher: str, *overrides: str, activation_checkpointing: bool = False):
    cfg = load_config("demo", TINY + [f"distill.teacher={teacher}", *overrides,
                                      f"train.activation_checkpointing={activation_checkpointing}"])
    recipe = SCDRecipe(cfg, EMPTY)
    student = materialize(parallelize(recipe.build_model(), cfg, None), torch.device("cpu"), 0)
    recipe.init_model(student)
    return recipe, student


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed((seed + zlib.crc32(name.replace("_checkpoint_wrapped_module.", "").encode())) % 2**63)
            p.add_(torch.randn(p.shape, generator=gen) * scale)


# --------------------------------------------------------------------------------------------------
# The student and its teacher
# --------------------------------------------------------------------------------------------------


def test_student_with_guidance_embedding_starts_exactly_as_its_teacher(teacher, teacher_seed, seed, gen):
    recipe, student = _recipe_and_student(teacher, "distill.guidance=sampled")
    assert not hasattr(recipe.teacher.net, "g_embedder")
    assert float(student.net.g_embedder.fc2.weight.abs().sum()) == 0.0  # zero-initialised output layer
    b = _batch(gen, 4)
    x_in, tau = torch.randn(4, 1, 8, 8, generator=gen), trigflow.sample_tau(4, -0.8, 1.6, 0.5, gen)
    with torch.no_grad():
        expected = trigflow.trigflow_velocity(recipe.teacher.net, x_in, tau, b["text_tokens"], b["text_pooled"])
        for w in (1.0, 4.5):
            F, u = student(x_in, tau, b["text_tokens"], b["text_pooled"], torch.full((4,), w))
            assert torch.equal(F, expected), f"w={w} (seeds {teacher_seed}, {seed})"
            assert u.shape == (4,) and torch.isfinite(u).all()


def test_teacher_of_another_architecture_is_refused(tmp_path, teacher):
    with pytest.raises(ValueError, match="model.depth=2 but this job has model.depth=3"):
        SCDRecipe(load_config("demo", TINY + ["model.depth=3", f"distill.teacher={teacher}"]), EMPTY).check_teacher(teacher)
    with pytest.raises(ValueError, match="distill.mode=scd needs distill.teacher"):
        SCDRecipe(load_config("demo", TINY), EMPTY)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        SCDRecipe(load_config("demo", TINY + [f"distill.teacher={teacher}"]), EMPTY).check_teacher(str(tmp_path / "no"))
    with pytest.raises(ValueError, match="train.compile=true does not work with distill.jvp_pass=forward_ad"):
        SCDRecipe(load_config("demo", TINY + ["train.compile=true", "distill.jvp_pass=forward_ad",
                                              f"distill.teacher={teacher}"]), EMPTY)


def test_checkpoint_with_activation_checkpointing_names_loads_into_a_bare_model(tmp_path, seed):
    _write_teacher(tmp_path, seed % 2**31, ["train.activation_checkpointing=true"])
    bare = build_mmdit(load_config("demo", TINY).model)
    checkpoint.load_weights(bare, tmp_path)
    wrapped_cfg = load_config("demo", TINY + ["train.activation_checkpointing=true"])
    reference = Trainer(wrapped_cfg, RectifiedFlowRecipe(wrapped_cfg, EMPTY))
    checkpoint.load(reference, tmp_path)
    for name, p in bare.named_parameters():
        wrapped = name.replace("joint_blocks.0.", "joint_blocks.0._checkpoint_wrapped_module.").replace(
            "joint_blocks.1.", "joint_blocks.1._checkpoint_wrapped_module.")
        assert torch.equal(p, reference.ema.shadow[wrapped]), f"{name} (seed {seed})"


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


def _inputs(gen: torch.Generator, tau: torch.Tensor):
    n = tau.shape[0]
    b = _batch(gen, n)
    x0, z = 0.5 * b["latent"], 0.5 * torch.randn(n, 1, 8, 8, generator=gen)
    return x0, z, tau, b["text_tokens"], b["text_pooled"], torch.full((n,), 2.0)


@pytest.mark.parametrize("jvp_pass", ["auto", "fused", "forward_ad"])
def test_loss_jvp_and_gradients_are_finite_in_bf16_near_tau_zero_and_pi_over_two(teacher, seed, gen, jvp_pass):
    """auto resolves to the fused pass under bf16 autocast too: the primal in bf16, the tangent in fp32 with its
    matmuls at distill.tangent_precision."""
    recipe, student = _recipe_and_student(teacher, "distill.tangent_warmup=none", f"distill.jvp_pass={jvp_pass}")
    _perturb(student, seed % 2**31)
    tau = torch.tensor([1e-5, 1e-3, 0.05, 1.52, trigflow.max_time(0.5), math.pi / 2 - 1e-5])
    x0, z, tau, ctx, pooled, w = _inputs(gen, tau)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_tau = trigflow.expand_like(torch.cos(tau), x0) * x0 + trigflow.expand_like(torch.sin(tau), z) * z
        dxdt = recipe.teacher_velocity(x_tau, tau, ctx, pooled, w)
        # The raw JVP pass in bf16 (the recipe runs it in fp32): the rearrangement keeps it finite.
        F_minus, J = trigflow.rearranged_jvp(lambda x, t: student(x, t, ctx, pooled)[0], x_tau / 0.5, tau, dxdt, 0.5)
        loss, metrics = recipe.objective(student, x0, z, tau, ctx, pooled, w)
        if jvp_pass == "auto":
            assert recipe.jvp_pass() == "fused"
    loss.backward()
    for name, value in {"dxdt": dxdt, "F": F_minus, "J": J, "loss": loss}.items():
        assert torch.isfinite(value).all(), f"{name} at tau {tau.tolist()} (seed {seed})"
    assert float(metrics["nonfinite_samples"]) == 0, f"seed {seed}"
    for name, p in student.named_parameters():
        assert torch.isfinite(p.grad).all(), f"grad of {name} (seed {seed})"


def test_fused_separate_and_forward_ad_passes_give_one_loss_and_one_gradient(teacher, seed, gen):
    """distill.jvp_pass changes how the student's F^- and J are computed, not what: in float64 the three give
    the same loss, metrics and gradients."""
    x0, z, tau, ctx, pooled, w = (t.double() for t in _inputs(gen, 0.02 + 1.5 * torch.rand(4, generator=gen)))
    results = {}
    for jvp_pass in ("forward_ad", "separate", "fused"):
        recipe, student = _recipe_and_student(teacher, f"distill.jvp_pass={jvp_pass}", "distill.tangent_warmup_steps=8")
        _perturb(student, seed % 2**31)
        student.double(), recipe.teacher.net.double()
        recipe.at_step(3)  # r = 3/8: both tangent terms matter
        loss, metrics = recipe.objective(student, x0, z, tau, ctx, pooled, w)
        loss.backward()
        results[jvp_pass] = loss.detach(), metrics, {n: p.grad for n, p in student.named_parameters()}
    loss_ref, metrics_ref, grads_ref = results["forward_ad"]
    assert float(metrics_ref["tangent_norm"]) > 0, f"seed {seed}"
    for jvp_pass in ("separate", "fused"):
        loss, metrics, grads = results[jvp_pass]
        torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{jvp_pass} (seed {seed}): {m}")
        torch.testing.assert_close(metrics["tangent_norm"], metrics_ref["tangent_norm"], rtol=1e-10, atol=1e-12)
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-12,
                                       msg=lambda m: f"{jvp_pass}: grad of {name} (seed {seed}): {m}")


@pytest.mark.parametrize("jvp_pass", ["fused", pytest.param("separate", marks=pytest.mark.slow)])
def test_per_block_compile_gives_eager_F_J_and_gradients_in_float64(teacher, seed, gen, jvp_pass):
    """train.compile=true compiles each joint block, tangent methods included: in float64, where rounding cannot
    hide a dropped or wrong tangent (pytorch#187284) or a wrong gradient (the transposed-layout trap of
    ``MMDiT.to_tokens``), F, J, the loss and the gradients equal eager's. Compiling takes ~30 s on a CPU, so the
    default run checks only the default pass."""
    import copy

    from trainer.parallelize import apply_compile

    x0, z, tau, ctx, pooled, w = (t.double() for t in _inputs(gen, 0.02 + 1.5 * torch.rand(3, generator=gen)))
    recipe, student = _recipe_and_student(teacher, f"distill.jvp_pass={jvp_pass}", "distill.tangent_warmup_steps=8")
    _perturb(student, seed % 2**31)
    student.double(), recipe.teacher.net.double()
    recipe.at_step(3)
    compiled = copy.deepcopy(student)
    apply_compile(compiled)
    passes, real = [], recipe.student_passes
    recipe.student_passes = lambda *args: passes.append(real(*args)) or passes[-1]  # keeps (F, u, J)
    results = []
    for model in (student, compiled):
        loss, _ = recipe.objective(model, x0, z, tau, ctx, pooled, w)
        loss.backward()
        F, _, J = passes[-1]
        results.append({"F": F.detach(), "J": J, "loss": loss.detach(),
                        **{f"grad of {n}": p.grad for n, p in model.named_parameters()}})
    eager, compiled_run = results
    assert eager.keys() == compiled_run.keys()
    for name, want in eager.items():
        rtol, atol = (1e-8, 1e-12) if name.startswith("grad") else (1e-10, 1e-12)
        torch.testing.assert_close(compiled_run[name], want, rtol=rtol, atol=atol, msg=lambda m: f"{name} (seed {seed}): {m}")


def test_a_non_finite_sample_is_zeroed_and_counted(teacher, seed, gen, monkeypatch):
    recipe, student = _recipe_and_student(teacher)
    x0, z, tau, ctx, pooled, w = _inputs(gen, 0.1 + 1.4 * torch.rand(4, generator=gen))
    clean = recipe.teacher_velocity

    def one_bad_row(*args):
        dxdt = clean(*args).clone()
        dxdt[2, 0, 3, 3] = float("inf")
        return dxdt

    monkeypatch.setattr(recipe, "teacher_velocity", one_bad_row)
    loss, metrics = recipe.objective(student, x0, z, tau, ctx, pooled, w)
    loss.backward()
    assert torch.isfinite(loss) and float(metrics["nonfinite_samples"]) == 1, f"seed {seed}"
    assert sum(float(metrics[f"tau{i}_loss_count"]) for i in range(4)) == 3, f"seed {seed}"
    assert all(torch.isfinite(p.grad).all() for p in student.parameters()), f"seed {seed}"
    # The three clean samples' loss is unchanged by the bad one: recompute them alone.
    keep = torch.tensor([0, 1, 3])
    monkeypatch.setattr(recipe, "teacher_velocity", clean)
    alone, _ = recipe.objective(student, x0[keep], z[keep], tau[keep], ctx[keep], pooled[keep], w[keep])
    torch.testing.assert_close(loss * 4 / 3, alone.detach(), msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("jvp_pass", ["fused", "separate", "forward_ad"])
def test_activation_checkpointing_leaves_the_jvp_and_gradients_unchanged(teacher, seed, gen, jvp_pass, monkeypatch):
    """Forward AD ignores checkpointing (pytorch#129293); the separate passes run the JVP under no_grad, where
    checkpointed blocks simply run forward. The fused pass carries the tangent through checkpointed blocks,
    and their recompute in backward skips it (no attention tangent runs during backward)."""
    results = []
    x0, z, tau, ctx, pooled, w = _inputs(gen, 0.05 + 1.5 * torch.rand(4, generator=gen))
    for ac in (False, True):
        recipe, student = _recipe_and_student(teacher, f"distill.jvp_pass={jvp_pass}", activation_checkpointing=ac)
        _perturb(student, seed % 2**31)
        recipe.at_step(10**6)
        loss, _ = recipe.objective(student, x0, z, tau, ctx, pooled, w)
        calls = []
        real = kernels.attention_with_tangent
        monkeypatch.setattr(kernels, "attention_with_tangent", lambda *a, **k: calls.append(1) or real(*a, **k))
        loss.backward()
        monkeypatch.setattr(kernels, "attention_with_tangent", real)
        assert not calls, f"{len(calls)} attention JVPs ran during backward (checkpointing {ac})"
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in student.named_parameters()}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6, msg=lambda m: f"seed {seed}: {m}")
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name} (seed {seed}): {m}")


def test_sct_needs_no_teacher_and_its_tangent_is_the_pair_velocity(seed, gen, monkeypatch):
    cfg = load_config("demo", TINY + ["distill.mode=sct", "distill.tangent_warmup=none"])
    recipe = SCDRecipe(cfg, EMPTY)
    student = materialize(parallelize(recipe.build_model(), cfg, None), torch.device("cpu"), 0)
    recipe.init_model(student)
    assert recipe.teacher is None
    x0, z, tau, ctx, pooled, w = _inputs(gen, 0.05 + 1.5 * torch.rand(4, generator=gen))
    seen = {}
    real_tangents = trigflow.rearranged_tangents

    def spy(tau_, dxdt, sigma_d):
        seen["dxdt"] = dxdt
        return real_tangents(tau_, dxdt, sigma_d)

    monkeypatch.setattr(trigflow, "rearranged_tangents", spy)
    loss, _ = recipe.objective(student, x0, z, tau, ctx, pooled, w)
    expected = trigflow.expand_like(torch.cos(tau), z) * z - trigflow.expand_like(torch.sin(tau), x0) * x0
    torch.testing.assert_close(seen["dxdt"], expected, msg=lambda m: f"seed {seed}: {m}")
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------------
# Sampling and training
# --------------------------------------------------------------------------------------------------


def test_sample_returns_latents_for_one_and_two_steps_and_refuses_missing_times(teacher, seed, gen):
    recipe, student = _recipe_and_student(teacher, "distill.guidance=sampled")
    b = _batch(gen, 3)
    outs = []
    for steps in (1, 2):
        g = torch.Generator().manual_seed(seed % 2**31)
        outs.append(recipe.sample(student, b["text_tokens"], b["text_pooled"], g, steps=steps, cfg_scale=3.0, shift=3.0))
        assert outs[-1].shape == (3, 1, 8, 8) and torch.isfinite(outs[-1]).all()
    assert not torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="3 sampling steps need 2 intermediate times"):
        recipe.sample(student, b["text_tokens"], b["text_pooled"], gen, steps=3)

