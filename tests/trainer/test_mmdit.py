"""The MM-DiT (MMDIT_RF.md section 4): adaLN-Zero identity at init, joint attention and the whole forward
against a float64 reference written here from the spec, positional cropping, exact parameter counts and
input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from infra.config import ModelConfig, load_config
from trainer.models.mmdit import (
    JointBlock,
    MMDiT,
    StreamBlock,
    build_mmdit,
    count_params,
    cropped_pos_embed,
    expected_param_count,
    sincos_2d_table,
)

SMALL = ModelConfig(
    depth=3, head_dim=16, in_channels=4, out_channels=4, patch_size=2, pooled_dim=12, context_dim=24,
    pos_embed_max_size=8, time_freq_dim=32,
)


def small_inputs(gen: torch.Generator, B: int = 2, H: int = 8, W: int = 6, L: int = 5, dtype=torch.float32):
    cfg = SMALL
    return (
        torch.randn(B, cfg.in_channels, H, W, generator=gen, dtype=dtype),
        torch.rand(B, generator=gen, dtype=dtype),
        torch.randn(B, L, cfg.context_dim, generator=gen, dtype=dtype),
        torch.randn(B, cfg.pooled_dim, generator=gen, dtype=dtype),
    )


def perturb(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random values for every weight, the zero-initialised ones included, so nothing is trivially zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.copy_(1 + 0.2 * noise if name.endswith(("ln_q.weight", "ln_k.weight")) else 0.3 * noise)
    return model


# --------------------------------------------------------------------------------------------------
# A float64 reference, written from the spec
# --------------------------------------------------------------------------------------------------


def linear(x, layer: nn.Linear):
    return x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def adaln(x, shift, scale):
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def ref_stream_qkv(stream: StreamBlock, s, c):
    """-> q, k, v as (B, N, heads, head_dim) and the stream's modulations."""
    mods = linear(silu(c), stream.adaLN_modulation).chunk(2 if stream.pre_only else 6, dim=-1)
    qkv = linear(adaln(s, mods[0], mods[1]), stream.qkv)
    B, N, _ = s.shape
    q, k, v = qkv.reshape(B, N, 3, stream.num_heads, stream.head_dim).unbind(2)
    return rms_norm(q, stream.ln_q.weight), rms_norm(k, stream.ln_k.weight), v, mods


def ref_stream_out(stream: StreamBlock, s, attn, mods):
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    s = s + gate_msa[:, None] * linear(attn, stream.proj)
    hidden = gelu_tanh(linear(adaln(s, shift_mlp, scale_mlp), stream.mlp[0]))
    return s + gate_mlp[:, None] * linear(hidden, stream.mlp[2])


def ref_joint_block(block: JointBlock, context, x, c):
    cq, ck, cv, c_mods = ref_stream_qkv(block.context_block, context, c)
    xq, xk, xv, x_mods = ref_stream_qkv(block.x_block, x, c)
    q, k, v = (torch.cat(pair, dim=1) for pair in ((cq, xq), (ck, xk), (cv, xv)))  # [context, x] (B, S, H, Dh)
    weights = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    out = torch.einsum("bhst,bthd->bshd", weights, v).flatten(2)  # (B, S, D)
    n_ctx = context.shape[1]
    x_out = ref_stream_out(block.x_block, x, out[:, n_ctx:], x_mods)
    if block.context_block.pre_only:
        return None, x_out
    return ref_stream_out(block.context_block, context, out[:, :n_ctx], c_mods), x_out


def ref_sincos_table(dim: int, size: int):
    """(size, size, dim): columns in the first half of the channels, rows in the second, each [sin, cos]."""
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(size, dtype=torch.float64)[:, None] * omega  # (size, quarter)
    enc = torch.cat([torch.sin(pos), torch.cos(pos)], dim=1)  # (size, dim/2)
    cols = enc[None, :, :].expand(size, size, -1)
    rows = enc[:, None, :].expand(size, size, -1)
    return torch.cat([cols, rows], dim=-1)


def ref_model(model: MMDiT, x, t, context, pooled):
    cfg = model.cfg
    B, C, H, W = x.shape
    p, D = cfg.patch_size, cfg.hidden_size
    h, w = H // p, W // p
    patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)  # row-major
    tokens = patches @ model.x_embedder.weight.reshape(D, -1).T + model.x_embedder.bias
    M = cfg.pos_embed_max_size
    top, left = (M - h) // 2, (M - w) // 2
    tokens = tokens + ref_sincos_table(D, M)[top:top + h, left:left + w].reshape(h * w, D)
    half = cfg.time_freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = cfg.time_scale * t[:, None] * freqs
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def mlp(emb, inp):
        return linear(silu(linear(inp, emb.fc1)), emb.fc2)

    c = mlp(model.t_embedder, t_freq) + mlp(model.y_embedder, pooled)
    ctx = linear(context, model.context_embedder)
    for block in model.joint_blocks:
        ctx, tokens = ref_joint_block(block, ctx, tokens, c)
    shift, scale = linear(silu(c), model.final_layer.adaLN_modulation).chunk(2, dim=-1)
    out = linear(adaln(tokens, shift, scale), model.final_layer.linear)  # (B, h*w, p*p*C_out)
    out = out.reshape(B, h, w, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(B, cfg.out_channels, H, W)


# --------------------------------------------------------------------------------------------------
# adaLN-Zero: identity at init
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, SMALL.depth - 1], ids=["joint_block", "last_block"])
def test_joint_block_is_the_identity_at_init(index, seed, gen):
    model = build_mmdit(SMALL, seed=seed % 2**31)
    block = model.joint_blocks[index]
    D = SMALL.hidden_size
    context, x, c = torch.randn(2, 5, D, generator=gen), torch.randn(2, 7, D, generator=gen), torch.randn(2, D, generator=gen)
    context_out, x_out = block(context, x, c)
    assert torch.equal(x_out, x), f"seed={seed}"
    if block.context_block.pre_only:
        assert context_out is None
    else:
        assert torch.equal(context_out, context), f"seed={seed}"


def test_model_output_is_zero_at_init(seed, gen):
    model = build_mmdit(SMALL, seed=seed % 2**31)
    out = model(*small_inputs(gen))
    assert out.shape == (2, SMALL.out_channels, 8, 6)
    assert torch.equal(out, torch.zeros_like(out)), f"seed={seed}"


def test_init_is_a_function_of_the_seed():
    a, b, c = build_mmdit(SMALL, seed=1), build_mmdit(SMALL, seed=1), build_mmdit(SMALL, seed=2)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["x_embedder.weight"], pc["x_embedder.weight"])


# --------------------------------------------------------------------------------------------------
# Joint attention and the forward pass against the float64 reference
# --------------------------------------------------------------------------------------------------


def perturbed_block(index: int, gen: torch.Generator) -> JointBlock:
    model = build_mmdit(SMALL)
    return perturb(model.joint_blocks[index], gen).double()


def block_inputs(gen: torch.Generator, n_ctx: int = 5, n_x: int = 12):
    D = SMALL.hidden_size
    return (
        torch.randn(2, n_ctx, D, generator=gen, dtype=torch.float64),
        torch.randn(2, n_x, D, generator=gen, dtype=torch.float64),
        torch.randn(2, D, generator=gen, dtype=torch.float64),
    )


def test_joint_block_equals_the_two_stream_float64_reference(seed, gen):
    block = perturbed_block(0, gen)
    context, x, c = block_inputs(gen)
    context_out, x_out = block(context, x, c)
    ref_context, ref_x = ref_joint_block(block, context, x, c)
    torch.testing.assert_close(x_out, ref_x, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed={seed}\n{m}")
    torch.testing.assert_close(context_out, ref_context, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed={seed}\n{m}")


def test_joint_attention_couples_the_streams(seed, gen):
    """Each stream's output depends on the other stream's tokens (one attention over both)."""
    block = perturbed_block(0, gen)
    context, x, c = block_inputs(gen)
    context_out, x_out = block(context, x, c)
    context_out2, _ = block(context, x + torch.randn(x.shape, generator=gen, dtype=x.dtype), c)
    _, x_out2 = block(context + torch.randn(context.shape, generator=gen, dtype=x.dtype), x, c)
    assert not torch.allclose(x_out, x_out2) and not torch.allclose(context_out, context_out2), f"seed={seed}"


def test_streams_have_their_own_weights():
    block = build_mmdit(SMALL).joint_blocks[0]
    ctx_params = {id(p) for p in block.context_block.parameters()}
    assert not ctx_params & {id(p) for p in block.x_block.parameters()}


def test_last_block_context_stream_is_pre_only():
    model = build_mmdit(SMALL)
    D = SMALL.hidden_size
    last, first = model.joint_blocks[-1].context_block, model.joint_blocks[0].context_block
    assert last.pre_only and not first.pre_only
    assert last.adaLN_modulation.out_features == 2 * D and first.adaLN_modulation.out_features == 6 * D
    assert not hasattr(last, "proj") and not hasattr(last, "mlp")
    assert all(not b.context_block.pre_only for b in model.joint_blocks[:-1])
    assert all(not b.x_block.pre_only for b in model.joint_blocks)


def test_last_block_equals_the_reference_with_context_as_keys_and_values_only(seed, gen):
    block = perturbed_block(SMALL.depth - 1, gen)
    context, x, c = block_inputs(gen)
    context_out, x_out = block(context, x, c)
    _, ref_x = ref_joint_block(block, context, x, c)
    assert context_out is None
    torch.testing.assert_close(x_out, ref_x, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed={seed}\n{m}")


def test_last_block_ignores_the_context_queries(seed, gen):
    block = perturbed_block(SMALL.depth - 1, gen)
    context, x, c = block_inputs(gen)
    _, before = block(context, x, c)
    D = SMALL.hidden_size
    with torch.no_grad():
        block.context_block.qkv.weight[:D] += 1.0  # the q rows of the (q, k, v) projection
        block.context_block.qkv.bias[:D] -= 1.0
        block.context_block.ln_q.weight.mul_(3.0)
    _, after = block(context, x, c)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12, msg=lambda m: f"seed={seed}\n{m}")


def test_model_forward_equals_the_float64_reference(seed, gen):
    model = perturb(build_mmdit(SMALL), gen).double()
    x, t, context, pooled = small_inputs(gen, dtype=torch.float64)
    out = model(x, t, context, pooled)
    ref = ref_model(model, x, t, context, pooled)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed={seed}\n{m}")


def test_model_output_depends_on_every_input(seed, gen):
    model = perturb(build_mmdit(SMALL), gen)
    inputs = small_inputs(gen)
    base = model(*inputs)
    for i, name in enumerate(("x", "t", "context", "pooled")):
        changed = list(inputs)
        changed[i] = inputs[i] + 0.5 if name != "t" else inputs[i] * 0.5
        assert not torch.allclose(model(*changed), base), f"seed={seed}: output ignores {name}"


# --------------------------------------------------------------------------------------------------
# Positional embedding
# --------------------------------------------------------------------------------------------------


def test_sincos_table_encodes_column_then_row_as_sin_then_cos():
    for dim, size in ((16, 6), (64, 5)):
        table = sincos_2d_table(dim, size)
        assert table.shape == (size * size, dim) and table.dtype == torch.float64
        torch.testing.assert_close(table, ref_sincos_table(dim, size).reshape(size * size, dim), rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_size", [8, 9])
@pytest.mark.parametrize("h, w", [(8, 8), (5, 5), (3, 7), (7, 2), (1, 1), (6, 3), (4, 8)])
def test_cropped_pos_embed_is_the_centre_crop_of_the_table(max_size, h, w):
    dim = 32
    table = sincos_2d_table(dim, max_size).reshape(max_size, max_size, dim)
    top, left = (max_size - h) // 2, (max_size - w) // 2
    expected = table[top:top + h, left:left + w].reshape(h * w, dim)
    torch.testing.assert_close(cropped_pos_embed(dim, max_size, h, w), expected, rtol=0, atol=0)


@pytest.mark.parametrize("h, w", [(9, 4), (4, 9), (12, 12)])
def test_grid_larger_than_the_table_is_an_error_naming_pos_embed_max_size(h, w):
    with pytest.raises(ValueError, match=rf"{h}x{w} patch grid.*8x8.*model\.pos_embed_max_size"):
        cropped_pos_embed(32, 8, h, w)


# --------------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, count", [("mmdit-2b", 2_028_334_144), ("mmdit-8b", 8_056_627_520)])
def test_parameter_count_matches_the_spec_exactly(preset, count):
    cfg = load_config(preset).model
    with torch.device("meta"):
        model = MMDiT(cfg)
    counts = count_params(model)
    assert counts["total"] == count == expected_param_count(cfg.depth)
    assert counts["image_stream"] + counts["text_stream"] + counts["shared"] == counts["total"]
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("depth", [1, 2, 5, 11])
def test_parameter_count_follows_the_cubic_formula_at_every_depth(depth):
    with torch.device("meta"):
        model = MMDiT(load_config("mmdit-2b", [f"model.depth={depth}"]).model)
    assert count_params(model)["total"] == expected_param_count(depth)


def test_positional_table_is_not_a_parameter():
    model = build_mmdit(SMALL)
    assert not [n for n, _ in model.named_parameters() if "pos" in n]
    assert not list(model.buffers())


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def bad_inputs():
    """(name, replace one input, the error must match)."""
    B, cfg = 2, SMALL
    return [
        ("x_channels", 0, torch.zeros(B, cfg.in_channels + 1, 8, 6), r"x must be \(B, 4, H, W\).*\(2, 5, 8, 6\)"),
        ("x_rank", 0, torch.zeros(B, cfg.in_channels, 8), r"x must be \(B, 4, H, W\).*\(2, 4, 8\)"),
        ("x_not_divisible", 0, torch.zeros(B, cfg.in_channels, 7, 6), r"7x6.*model\.patch_size=2"),
        ("x_grid_too_large", 0, torch.zeros(B, cfg.in_channels, 18, 6), r"9x3 patch grid.*model\.pos_embed_max_size"),
        ("t_column", 1, torch.zeros(B, 1), r"t must have shape \(2,\).*\(2, 1\)"),
        ("t_batch", 1, torch.zeros(B + 1), r"t must have shape \(2,\).*\(3,\)"),
        ("context_width", 2, torch.zeros(B, 5, cfg.context_dim + 1), r"context must be.*model\.context_dim=24.*\(2, 5, 25\)"),
        ("context_batch", 2, torch.zeros(B + 1, 5, cfg.context_dim), r"context must be \(B=2.*\(3, 5, 24\)"),
        ("context_rank", 2, torch.zeros(B, cfg.context_dim), r"context must be.*\(2, 24\)"),
        ("pooled_width", 3, torch.zeros(B, cfg.pooled_dim - 1), r"pooled must be.*model\.pooled_dim=12.*\(2, 11\)"),
        ("pooled_batch", 3, torch.zeros(B + 1, cfg.pooled_dim), r"pooled must be \(B=2.*\(3, 12\)"),
    ]


@pytest.mark.parametrize("name, index, value, match", bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_bad_input_is_an_error_that_says_what_and_where(name, index, value, match, gen):
    model = build_mmdit(SMALL)
    inputs = list(small_inputs(gen))
    inputs[index] = value
    with pytest.raises(ValueError, match=match):
        model(*inputs)


def test_per_block_compile_gives_eager_gradients_in_float64(seed, gen):
    """Per-block compile (train.compile) against eager in float64, where rounding cannot hide an error: a
    compiled block fed the patch embedding's transposed layout returned gradients 5-10% off (torch 2.13 CPU)."""
    import copy

    from trainer.parallelize import apply_compile

    net = build_mmdit(load_config("demo", ["model.depth=3", "model.head_dim=16"]).model).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    args = (torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64), torch.rand(3, generator=gen, dtype=torch.float64),
            torch.randn(3, 16, 64, generator=gen, dtype=torch.float64), torch.randn(3, 64, generator=gen, dtype=torch.float64))
    compiled = copy.deepcopy(net)
    apply_compile(compiled)
    for model in (net, compiled):
        model(*args).pow(2).sum().backward()
    for (name, p), q in zip(compiled.named_parameters(), net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name} (seed {seed}): {m}")
