"""Every GPU figure docs/PERFORMANCE.md leaves open, on one CUDA GPU in at most 8 minutes: one JSON, one table.

Sections, each reusing its benchmark script's functions; each is independent (one that fails or runs past its
time budget records why, and the suite goes on) and prints its time:

  precision     bf16 against fp32, one step's loss and gradient per recipe, sCD JVP pass and tangent precision,
                TF32 included (benchmarks/precision.py)
  attention     the Triton attention JVP, tiles autotuned, against SDPA's flash forward and the math JVP at SD3
                shapes, bf16 (benchmarks/attention_jvp.py)
  model_step    our MM-DiT against diffusers' SD3Transformer2DModel, d=24, 256^2 and 1024^2, bf16, forward +
                backward (benchmarks/model_step.py; without diffusers that row says so)
  scd_step      one sCD iteration over one pretraining iteration, bf16, d=24 at 512^2, per JVP pass and tangent
                precision (benchmarks/scd_step.py)
  pretrain_mfu  the pretraining loop itself (trainer.loop.Trainer, no Ray) on synthetic batches: step time,
                samples/s, MFU and peak memory, d=24 at 1024^2 (and 256^2 as time allows), torch.compile and
                activation checkpointing each on and off

    python benchmarks/gpu_suite.py --out results/gpu          # one CUDA GPU; torch and triton (diffusers optional)
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite   # CPU, tiny sizes, Triton interpreted: the suite runs

Writes OUT/gpu_suite.json and OUT/gpu_suite.md. Plain Python, no Ray or MLflow.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    # Triton reads this when it is first imported (diffusers may import it): --smoke runs the kernel on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from benchmarks import attention_jvp, model_step, precision, scd_step  # noqa: E402
from infra.config import ModelConfig, load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.recipes.rectified_flow import RectifiedFlowRecipe  # noqa: E402

BUDGET_S = 460  # of the 8 minutes: what the sections may take together (their shares of it below)
SHARES = {"precision": 0.1, "attention": 0.16, "model_step": 0.17, "scd_step": 0.2, "pretrain_mfu": 0.37}
SD3 = dict(depth=24, head_dim=64, context_dim=4096, pooled_dim=2048, text_tokens=154)  # SD3-medium, 2.0B params
TINY = dict(depth=2, head_dim=32, context_dim=64, pooled_dim=64, text_tokens=8)


class OutOfTime(BaseException):
    """A section ran past its share of the budget. Not an Exception, so that no ``except Exception`` on the way
    (a probe of ours, a library's optional import) swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in the main thread after ``seconds`` (between Python bytecodes: a running kernel finishes)."""
    def expire(signum, frame):
        raise OutOfTime(f"ran past its {seconds:.0f} s share of the suite's budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Sections: each fills ``out`` as it goes, so that what it measured before a failure is kept
# --------------------------------------------------------------------------------------------------


def section_precision(out: dict, device: torch.device, smoke: bool) -> None:
    if smoke:
        runs = [("16x8x8", precision.sizes(8, 1, 16), 1, 2,
                 precision.configurations(("fused",), ("fixed",), ("fp32", "bf16")))]
    else:
        runs = [("16x64x64", precision.sizes(64, 2, 32), 3, 4, precision.configurations()),
                ("16x128x128", precision.sizes(128, 2, 32), 2, 2,
                 precision.configurations(("fused",), ("fixed",)))]
    for latents, size, seeds, batch, rows in runs:
        rows = precision.measure(device, size, seeds, batch, rows)
        out.setdefault("tables", []).append({"latents": latents, "seeds": seeds, "batch": batch, "rows": rows})


@contextlib.contextmanager
def triton_interpreted():
    """--smoke: the attention JVP's Triton kernel in its interpreter, on CPU tensors (kernels.jvp reads the
    backend at each call, so the variable is set for the attention section alone)."""
    previous = os.environ.get(kernels.BACKEND_ENV)
    os.environ[kernels.BACKEND_ENV] = "triton"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[kernels.BACKEND_ENV]
        else:
            os.environ[kernels.BACKEND_ENV] = previous


def section_attention(out: dict, device: torch.device, smoke: bool) -> None:
    if smoke:
        with triton_interpreted():
            attention_table(out, device, [(1, 2, 48)], torch.float32, 2)
    else:
        # (batch, heads, S): SD3 2B at 256^2 (410 tokens) and 1024^2 (4250), 8B at 1024^2 (4429).
        attention_table(out, device, [(8, 24, 410), (2, 24, 4250), (1, 38, 4429)], torch.bfloat16, 10)


def attention_table(out: dict, device: torch.device, shapes, dtype: torch.dtype, repeats: int) -> None:
    out["backend"] = kernels.select_backend(torch.empty(0, 0, 0, attention_jvp.HEAD_DIM, dtype=dtype, device=device))
    rows = out.setdefault("rows", [])
    for batch, heads, seq in shapes:
        cases = []
        for case in attention_jvp.CASES:  # one run each (it also autotunes): a case that fails is left out, said why
            try:
                with torch.no_grad():
                    attention_jvp.case_function(case, attention_jvp.make_inputs(batch, heads, seq, dtype, device))()
                cases.append(case)
            except Exception as error:  # e.g. Triton's interpreter cannot read torch.func's wrapped tensors (op_jvp)
                out.setdefault("case_errors", {})[f"{case} {(batch, heads, seq)}"] = f"{type(error).__name__}: {error}"
        ms = attention_jvp.median_ms(cases, batch, heads, seq, dtype, device.type, repeats)
        peak = {case: attention_jvp.peak_memory_bytes(case, batch, heads, seq, dtype, device.type) / 2**20
                for case in cases}
        flops = attention_jvp.attention_flops(batch, heads, seq)
        rows.append({"batch": batch, "heads": heads, "seq": seq, "ms": ms, "peak_mib": peak,
                     "tflops": {c: attention_jvp.JVP_FLOP_FACTOR[c] * flops / (ms[c] * 1e-3) / 1e12 for c in ms},
                     "fused_over_sdpa": ms["fused_jvp"] / ms["sdpa_forward"],
                     "math_over_fused": ms["math_jvp"] / ms["fused_jvp"],
                     "fused_over_math_memory": peak["fused_jvp"] / max(peak["math_jvp"], 1e-9)})
    if out["backend"] == "triton" and device.type == "cuda":
        from kernels.jvp_triton import tuned_tiles

        out["tuned_tiles"] = {str(key[:3]): tiles for key, tiles in tuned_tiles().items()}


def section_model_step(out: dict, device: torch.device, smoke: bool) -> None:
    sizes = TINY if smoke else SD3
    # (latent side, batch): 256^2 and 1024^2 px through SD3's 8x VAE.
    resolutions, warmup, iters = ([(8, 2), (16, 2)], 1, 2) if smoke else ([(32, 8), (128, 2)], 2, 6)
    cfg = ModelConfig(depth=sizes["depth"], head_dim=sizes["head_dim"], in_channels=16, out_channels=16,
                      pooled_dim=sizes["pooled_dim"], context_dim=sizes["context_dim"],
                      pos_embed_max_size=16 if smoke else 192)
    models = {"ours": model_step.build_ours(cfg, device)}
    try:
        models["diffusers"] = model_step.build_diffusers(cfg, resolutions[-1][0], device)
    except ImportError as error:
        out["diffusers"] = str(error)
    for model in models.values():
        model_step.randomize(model, 0)
    out["params"] = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    rows = out.setdefault("rows", [])
    for latent, batch in resolutions:
        inputs = model_step.step_inputs(cfg, batch, latent, sizes["text_tokens"], device)
        steps = {name: model_step.make_step(model, name == "ours", inputs, torch.bfloat16, device)
                 for name, model in models.items()}
        times = model_step.alternate(steps, device, warmup, iters)
        row = {"resolution": latent * 8, "batch": batch, **{f"{n}_ms": 1e3 * min(t) for n, t in times.items()}}
        row.update({f"{n}_median_ms": 1e3 * statistics.median(t) for n, t in times.items()})
        if "diffusers" in times:
            row["ratio"], row["ratio_of_pairs"] = model_step.ratios(times["ours"], times["diffusers"])
        rows.append(row)


def section_scd_step(out: dict, device: torch.device, smoke: bool) -> None:
    sizes = TINY if smoke else SD3
    args = scd_step.parse_args([
        "--device", device.type, "--precision", "bf16", "--depth", str(sizes["depth"]),
        "--head-dim", str(sizes["head_dim"]), "--resolution", "64" if smoke else "512",
        "--batch", "2" if smoke else "4", "--text-tokens", str(sizes["text_tokens"]),
        "--context-dim", str(sizes["context_dim"]), "--pooled-dim", str(sizes["pooled_dim"]),
        "--warmup", "1", "--iters", "1" if smoke else "4", "--passes", "fused", "separate",
        "--tangent-precisions", *(["fp32", "bf16"] if smoke else ["fp32", "tf32", "bf16"]),
    ])
    out.update(scd_step.measure(args))


# Seconds a configuration of the pretraining loop is expected to need on one GPU at d=24 (building a 2B model
# with its EMA and AdamW, warmup, timed steps): compiling the blocks dominates.
EXPECTED_S = {False: 30, True: 100}


def section_pretrain_mfu(out: dict, device: torch.device, smoke: bool, deadline: float) -> None:
    """(compile, activation checkpointing) in every combination at 1024^2, then at 256^2 while time is left."""
    if smoke:
        base, resolutions, warmup, steps = "demo", [(8, 4)], 1, 2
        overrides = ["model.depth=2", "model.head_dim=16"]
    else:
        base, resolutions, warmup, steps = "mmdit-2b", [(128, 4), (32, 32)], 2, 6
        overrides = []
    rows = out.setdefault("rows", [])
    for latent, batch in resolutions:
        for compiled in (False, True):
            for checkpointing in (False, True):
                row = {"resolution": latent * 8, "batch": batch, "compile": compiled,
                       "activation_checkpointing": checkpointing}
                rows.append(row)
                if not smoke and time.perf_counter() + EXPECTED_S[compiled] > deadline:
                    row["skipped"] = "not enough of the suite's time budget left"
                    continue
                cfg = load_config(base, overrides + [
                    f"data.latent_size={latent}", f"train.global_batch_size={batch}", f"train.compile={compiled}",
                    f"train.activation_checkpointing={checkpointing}", f"train.steps={warmup}",
                    f"train.log_every={warmup}", "train.eval_every=0", "optim.warmup_steps=0"])
                row.update(loop_throughput(cfg, device, warmup, steps, smoke))
                free(device)


def loop_throughput(cfg, device: torch.device, warmup: int, steps: int, smoke: bool) -> dict:
    """Trainer.fit on one synthetic batch repeated: ``warmup`` steps (compile, allocator), then ``steps`` timed
    ones, whose log line gives the figures."""
    m, B, H, L = cfg.model, cfg.train.global_batch_size, cfg.data.latent_size, cfg.data.text_tokens
    empty = {"text_tokens": torch.zeros(L, m.context_dim), "text_pooled": torch.zeros(m.pooled_dim)}
    start = time.perf_counter()
    with smoke_compile() if smoke else contextlib.nullcontext():
        trainer = Trainer(cfg, RectifiedFlowRecipe(cfg, empty))
        gen = torch.Generator().manual_seed(0)
        batch = {"latent": torch.randn(B, m.in_channels, H, H, generator=gen).to(trainer.device),
                 "text_tokens": torch.randn(B, L, m.context_dim, generator=gen).to(trainer.device),
                 "text_pooled": torch.randn(B, m.pooled_dim, generator=gen).to(trainer.device)}
        forever = iter(lambda: batch, None)
        trainer.fit(forever)
        warm = time.perf_counter() - start
        trainer.cfg.train.steps = trainer.cfg.train.log_every = warmup + steps
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        metrics = trainer.fit(forever)
    del trainer
    keys = ("step_time_s", "samples_per_s", "tokens_per_s", "mfu", "peak_memory_gib")
    return {"build_and_warmup_s": warm, **{k: metrics.get(k) for k in keys}}


@contextlib.contextmanager
def smoke_compile():
    """--smoke: torch.compile traces with dynamo but skips inductor, whose code generation takes ~30 s per block
    on a CPU; the numbers of a CPU run mean nothing anyway."""
    original = torch.nn.Module.compile
    torch.nn.Module.compile = functools.partialmethod(original, backend="eager")
    try:
        yield
    finally:
        torch.nn.Module.compile = original


SECTIONS = {
    "precision": section_precision,
    "attention": section_attention,
    "model_step": section_model_step,
    "scd_step": section_scd_step,
    "pretrain_mfu": section_pretrain_mfu,
}


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(report: dict) -> str:
    lines = [f"# GPU suite: {report['device']}, torch {report['torch']}, triton {report['triton']}"
             f"{' (--smoke: tiny sizes on CPU, the numbers mean nothing)' if report['smoke'] else ''}", ""]
    for name, section in report["sections"].items():
        lines += [f"## {name} ({section['seconds']:.0f} s)", ""]
        if "error" in section:
            lines += [f"**error:** {section['error']}", ""]
        r = section["result"]
        if name == "precision":
            for table in r.get("tables", []):
                lines += [f"{table['latents']} latents, batch {table['batch']}, {table['seeds']} seeds:", "",
                          precision.markdown(table["rows"]), ""]
        elif name == "attention":
            lines += [f"backend {r.get('backend')}; autotuned tiles {r.get('tuned_tiles', '-')}; "
                      f"cases left out: {r.get('case_errors', 'none')}", "",
                      "| B | H | S | " + " | ".join(f"{c} ms" for c in attention_jvp.CASES)
                      + " | fused / sdpa time | math / fused time | fused / math peak memory |", "|---" * 10 + "|"]
            for row in r.get("rows", []):
                lines.append(f"| {row['batch']} | {row['heads']} | {row['seq']} | "
                             + " | ".join(fmt(row["ms"].get(c), ".2f") for c in attention_jvp.CASES)
                             + f" | {row['fused_over_sdpa']:.2f}x | {row['math_over_fused']:.2f}x | "
                             f"{row['fused_over_math_memory']:.3f} |")
        elif name == "model_step":
            if "diffusers" in r:
                lines += [f"diffusers: {r['diffusers']}", ""]
            lines += [f"parameters {r.get('params')}", "", "| resolution | batch | ours ms (min / median) "
                      "| diffusers ms (min / median) | ours / diffusers (medians; pairs) |", "|---|---|---|---|---|"]
            for row in r.get("rows", []):
                lines.append(f"| {row['resolution']}^2 | {row['batch']} | {row['ours_ms']:.1f} / "
                             f"{row['ours_median_ms']:.1f} | {fmt(row.get('diffusers_ms'), '.1f')} / "
                             f"{fmt(row.get('diffusers_median_ms'), '.1f')} | {fmt(row.get('ratio'), '.3f')}; "
                             f"{fmt(row.get('ratio_of_pairs'), '.3f')} |")
        elif name == "scd_step" and "rows" in r:
            lines += [f"pretraining iteration {r['pretrain_s'] * 1e3:.1f} ms, {r['params'] / 1e6:.0f}M params, "
                      f"{r['latent']}x{r['latent']} latents", "", scd_step.markdown(r)]
        elif name == "pretrain_mfu":
            lines += ["| resolution | batch | compile | checkpointing | step s | samples/s | MFU | peak GiB "
                      "| build + warmup s |", "|---" * 9 + "|"]
            for row in r.get("rows", []):
                if "skipped" in row:
                    figures = f"{row['skipped']} | | | | |"
                else:  # a row the time limit cut short has no figures
                    figures = (f"{fmt(row.get('step_time_s'))} | {fmt(row.get('samples_per_s'))} | "
                               f"{fmt(row.get('mfu'), '.1%')} | {fmt(row.get('peak_memory_gib'), '.1f')} | "
                               f"{fmt(row.get('build_and_warmup_s'), '.0f')} |")
                lines.append(f"| {row['resolution']}^2 | {row['batch']} | {row['compile']} | "
                             f"{row['activation_checkpointing']} | {figures}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for gpu_suite.json and gpu_suite.md")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreted: checks the suite runs")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds all sections may take together")
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_suite needs a CUDA GPU (or --smoke, which runs tiny sizes on the CPU)")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton_version, "smoke": args.smoke, "sections": {}}
    start = time.perf_counter()
    for i, name in enumerate(args.sections):
        # A section gets its share of what is left, so time an earlier one did not use goes to the later ones.
        left = args.budget_s - (time.perf_counter() - start)
        budget = left * SHARES[name] / sum(SHARES[n] for n in args.sections[i:])
        section = report["sections"][name] = {"budget_s": budget, "result": {}}
        t0 = time.perf_counter()
        print(f"[gpu_suite] {name}: up to {budget:.0f} s ...", flush=True)
        try:
            if budget < 1:
                raise OutOfTime("skipped: the suite's budget was spent")
            with time_limit(budget):
                extra = {"deadline": t0 + budget} if name == "pretrain_mfu" else {}
                SECTIONS[name](section["result"], device, args.smoke, **extra)
        except (Exception, OutOfTime) as error:  # one section's failure must not cost the others their figures
            section["error"] = f"{type(error).__name__}: {error}"
            section["traceback"] = traceback.format_exc()
            print(section["traceback"], file=sys.stderr, flush=True)
        section["seconds"] = time.perf_counter() - t0
        free(device)
        print(f"[gpu_suite] {name}: {'error' if 'error' in section else 'done'} in {section['seconds']:.1f} s",
              flush=True)
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / "gpu_suite.md").write_text(table + "\n")
    print(table)
    print(f"[gpu_suite] {report['seconds']:.0f} s in all; wrote {args.out / 'gpu_suite.json'} and gpu_suite.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
