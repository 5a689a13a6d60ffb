"""Time and peak memory of attention, its fused forward+JVP, and forward-mode AD through math attention.

Cases, at each shape (batch, heads, S, head_dim):
  sdpa_forward - F.scaled_dot_product_attention, the backend PyTorch picks (flash for bf16 on CUDA);
  fused_jvp    - kernels.attention_jvp: out and dout in one pass (Triton on CUDA, streamed PyTorch on CPU);
  op_jvp       - torch.func.jvp(kernels.attention): what a model's JVP pass runs (SDPA primal + fused JVP);
  math_jvp     - torch.func.jvp through SDPA pinned to the MATH backend, the only built-in path with
                 forward-mode AD (pytorch/pytorch#128971), which materialises S x S matrices.
TFLOP/s counts 4*B*H*S^2*D for the forward and 3x that for the JVP cases (six matmuls instead of two).

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what the inputs hold; on CPU, the largest growth of
the resident set (/proc/self/statm, sampled every 0.5 ms) while the case runs once, each case in a fresh
subprocess, so that memory one case freed cannot be reused unseen by the next. Time: median over rounds in which the cases take turns.

    python benchmarks/attention_jvp.py                  # CPU: fp32, B=1, a few shapes, a few minutes
    python benchmarks/attention_jvp.py --grid sd3       # SD3 grid: heads 24/38, S 410-4429, batch 1-8
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402  (the repository root is put on the path above for plain `python` runs)

CASES = ("sdpa_forward", "fused_jvp", "op_jvp", "math_jvp")
JVP_FLOP_FACTOR = {"sdpa_forward": 1, "fused_jvp": 3, "op_jvp": 3, "math_jvp": 3}
HEAD_DIM = 64
# (batch, heads, S). S = 410/589 are 256^2 images with 154/333 text tokens, 4250/4429 the same at 1024^2;
# heads = depth in SD3 (24 for 2B, 38 for 8B).
SD3_GRID = [(b, h, s) for h in (24, 38) for s in (410, 589, 4250, 4429) for b in (1, 2, 4, 8)]
# On 2 CPU cores: the 256^2 shapes at full width, and S = 4096 with fewer heads so math_jvp fits in memory.
CPU_QUICK = [(1, 24, 410), (1, 24, 589), (1, 4, 4096)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(batch, heads, seq, dtype, device):
    """q, k, v, dq, dk, dv of shape (batch, heads, seq, HEAD_DIM)."""
    return [torch.randn(batch, heads, seq, HEAD_DIM, dtype=dtype, device=device) for _ in range(6)]


def math_attention(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def case_function(case, inputs):
    q, k, v, dq, dk, dv = inputs
    if case == "sdpa_forward":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if case == "fused_jvp":
        return lambda: kernels.attention_jvp(q, k, v, dq, dk, dv)
    if case == "op_jvp":
        return lambda: torch.func.jvp(kernels.attention, (q, k, v), (dq, dk, dv))
    if case == "math_jvp":
        return lambda: torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:  # Linux: sizes in pages, the second field is resident
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_resident_growth(run) -> int:
    """Largest growth of this process's resident set while ``run()`` executes, sampled every 0.5 ms by a
    thread (getrusage's lifetime peak would also count the transient peak of importing torch)."""
    baseline = resident_bytes()
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak, resident_bytes()) - baseline


@torch.no_grad()
def peak_memory_bytes(case, batch, heads, seq, dtype, device) -> int:
    """Peak bytes one run of ``case`` allocates beyond its inputs, measured in this process."""
    run = case_function(case, make_inputs(batch, heads, seq, dtype, device))
    if device == "cpu":
        return peak_resident_growth(run)
    run()  # compile and autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - held


def peak_memory_in_subprocess(case, batch, heads, seq, dtype_name) -> int:
    """CPU peak memory in a fresh process, so that the peak resident set is this case's alone."""
    command = [sys.executable, os.path.abspath(__file__), "--threads", str(torch.get_num_threads()),
               "--child", json.dumps([case, batch, heads, seq, dtype_name])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"case {case} at {(batch, heads, seq)} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


@torch.no_grad()
def median_ms(cases, batch, heads, seq, dtype, device, repeats) -> dict[str, float]:
    """Median milliseconds per case; the cases take turns within each round, so that load from other
    processes on a shared machine hits them alike and the ratios stay meaningful."""
    runs = {case: case_function(case, make_inputs(batch, heads, seq, dtype, device)) for case in cases}
    for run in runs.values():
        run()  # warm-up: Triton compilation, allocator caches
    times = {case: [] for case in cases}
    for _ in range(repeats):
        for case, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times[case].append(time.perf_counter() - start)
    return {case: 1e3 * statistics.median(t) for case, t in times.items()}


def attention_flops(batch, heads, seq) -> float:
    return 4.0 * batch * heads * seq * seq * HEAD_DIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--grid", choices=["quick", "sd3"], help="default: sd3 on CUDA, quick on CPU")
    parser.add_argument("--shape", action="append", default=[], metavar="B,H,S", help="add a shape (repeatable)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--repeats", type=int, help="timed runs per case (median); default 20 on CUDA, 5 on CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:
        case, batch, heads, seq, dtype_name = json.loads(args.child)  # --threads was applied above
        print(peak_memory_bytes(case, batch, heads, seq, DTYPES[dtype_name], "cpu"))
        return

    on_cuda = args.device == "cuda"
    dtype_name = args.dtype or ("bfloat16" if on_cuda else "float32")
    repeats = args.repeats or (20 if on_cuda else 5)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    grid = args.grid or (None if shapes else ("sd3" if on_cuda else "quick"))
    if grid:
        shapes = {"sd3": SD3_GRID, "quick": CPU_QUICK}[grid] + shapes
    cases = args.cases.split(",")
    for case in cases:
        case_function(case, [None] * 6)  # reject unknown names before any measurement

    device_name = torch.cuda.get_device_name() if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {device_name}, torch {torch.__version__}, {dtype_name}, head_dim {HEAD_DIM}, median of {repeats}, "
          f"fused backend: {kernels.select_backend(torch.empty(0, 0, 0, HEAD_DIM, dtype=DTYPES[dtype_name], device=args.device))}")
    print(f"{'B':>2} {'H':>3} {'S':>5}  {'case':<13} {'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9}")
    for batch, heads, seq in shapes:
        if on_cuda:
            peak = {case: peak_memory_bytes(case, batch, heads, seq, DTYPES[dtype_name], "cuda") for case in cases}
        else:
            peak = {case: peak_memory_in_subprocess(case, batch, heads, seq, dtype_name) for case in cases}
        ms = median_ms(cases, batch, heads, seq, DTYPES[dtype_name], args.device, repeats)
        for case in cases:
            tflops = JVP_FLOP_FACTOR[case] * attention_flops(batch, heads, seq) / (ms[case] * 1e-3) / 1e12
            print(f"{batch:>2} {heads:>3} {seq:>5}  {case:<13} {ms[case]:>9.2f} {tflops:>8.3f} {peak[case] / 2**20:>9.1f}")
        ratios = []
        if {"fused_jvp", "sdpa_forward"} <= ms.keys():
            ratios.append(f"fused/sdpa time {ms['fused_jvp'] / ms['sdpa_forward']:.2f}x")
        if {"fused_jvp", "math_jvp"} <= ms.keys():
            ratios.append(f"math/fused time {ms['math_jvp'] / ms['fused_jvp']:.2f}x")
            ratios.append(f"fused/math peak memory {peak['fused_jvp'] / max(peak['math_jvp'], 1):.3f}")
        if ratios:
            print(f"{'':>13}ratios: " + ", ".join(ratios), flush=True)
    probe = torch.empty(0, 0, 0, HEAD_DIM, dtype=DTYPES[dtype_name], device=args.device)
    if on_cuda and kernels.select_backend(probe) == "triton":
        from kernels.jvp_triton import tuned_tiles

        for key, tiles in tuned_tiles().items():
            print(f"# autotuned tiles for (seq_q, seq_k, head_dim, dtypes...) = {key[:3]}: {tiles}")


if __name__ == "__main__":
    main()
