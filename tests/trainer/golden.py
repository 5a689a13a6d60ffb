"""Golden loss curves: fixed-seed fp32 CPU runs of each recipe whose per-step loss and gradient norm are
stored in ``tests/trainer/golden/RECIPE.json``. A refactor that should not move numerics must reproduce
them (``tests/trainer/test_golden_losses.py``).

When numerics change on purpose, regenerate and say why in the commit that does it:

    python -m tests.trainer.golden            # rewrites tests/trainer/golden/*.json
    python -m tests.trainer.golden --check    # prints the largest deviation from the stored curves

The runs use synthetic batches drawn from a fixed seed (not the loader: data order has its own tests), one
intra-op thread (so the reduction order, and with it every bit, is fixed), and the demo model of
``configs/demo.yaml``. The sCD run distils a teacher whose weights are the seeded initialisation plus seeded
noise, with a tangent warmup shorter than the run so that r < 1 and r = 1 are both covered.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from pathlib import Path

import torch

from infra.config import JobConfig, dump_config, load_config
from trainer import checkpoint
from trainer.loop import Trainer, TrainHooks
from trainer.recipes import build_recipe

GOLDEN_DIR = Path(__file__).parent / "golden"
STEPS = 20
COMMON = [f"train.steps={STEPS}", "train.seed=1234", "train.global_batch_size=16", "train.log_every=1",
          "train.eval_every=0", "train.device=cpu", "train.precision=fp32"]
RUNS = {
    "rectified_flow": ("demo", ["optim.warmup_steps=5"]),
    "scd": ("distill-demo", ["distill.tangent_warmup_steps=10", "distill.guidance=sampled"]),
}
TEACHER_SEED = 99


class Recorder(TrainHooks):
    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})


def batches(cfg: JobConfig):
    """A new synthetic batch per step: data in [-1, 1] and Gaussian text features, from a fixed seed."""
    m, B, H, L = cfg.model, cfg.train.global_batch_size, cfg.data.latent_size, cfg.data.text_tokens
    gen = torch.Generator().manual_seed(2024)
    while True:
        yield {
            "latent": torch.rand(B, m.in_channels, H, H, generator=gen) * 2 - 1,
            "text_tokens": torch.randn(B, L, m.context_dim, generator=gen),
            "text_pooled": torch.randn(B, m.pooled_dim, generator=gen),
        }


def empty_condition(cfg: JobConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {"text_tokens": torch.randn(cfg.data.text_tokens, cfg.model.context_dim, generator=gen),
            "text_pooled": torch.randn(cfg.model.pooled_dim, generator=gen)}


def write_teacher(cfg: JobConfig, directory: Path) -> None:
    """A pretraining checkpoint of ``cfg``'s model whose EMA weights are the init plus seeded noise."""
    trainer = Trainer(cfg, build_recipe("rectified_flow", cfg, empty_condition(cfg)))
    with torch.no_grad():
        for name, shadow in trainer.ema.shadow.items():
            gen = torch.Generator().manual_seed((TEACHER_SEED + zlib.crc32(name.encode())) % 2**63)
            shadow.add_(torch.randn(shadow.shape, generator=gen) * 0.05)
    checkpoint.save(trainer, directory, config_yaml=dump_config(cfg))


def run(recipe: str) -> list[dict[str, float]]:
    """The per-step loss and gradient norm of the golden run of ``recipe``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        preset, overrides = RUNS[recipe]
        with tempfile.TemporaryDirectory(prefix="flowscale-golden-") as tmp:
            if recipe == "scd":
                write_teacher(load_config("demo", COMMON), Path(tmp))
                overrides = [*overrides, f"distill.teacher={tmp}"]
            cfg = load_config(preset, COMMON + overrides)
            hooks = Recorder()
            Trainer(cfg, build_recipe(recipe, cfg, empty_condition(cfg)), hooks).fit(batches(cfg))
            return hooks.rows
    finally:
        torch.set_num_threads(threads)


def stored(recipe: str) -> list[dict[str, float]]:
    return json.loads((GOLDEN_DIR / f"{recipe}.json").read_text())["steps"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate (default) or check the golden loss curves.")
    parser.add_argument("--check", action="store_true", help="compare with the stored curves, write nothing")
    args = parser.parse_args(argv)
    for recipe in RUNS:
        rows = run(recipe)
        if args.check:
            worst = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(rows, stored(recipe)) for k in ("loss", "grad_norm"))
            print(f"{recipe}: largest relative deviation {worst:.3g}")
            continue
        GOLDEN_DIR.mkdir(exist_ok=True)
        body = {"torch": torch.__version__, "steps": rows}
        (GOLDEN_DIR / f"{recipe}.json").write_text(json.dumps(body, indent=1) + "\n")
        print(f"wrote {GOLDEN_DIR / recipe}.json ({len(rows)} steps, final loss {rows[-1]['loss']:.6g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
