"""How close is a distilled 1-/2-step student to its teacher on the digits demo?

    python benchmarks/distill_quality.py --teacher ~/flowscale/runs/PRETRAIN_RUN/checkpoint_00000800 \\
        --student ~/flowscale/runs/DISTILL_RUN/checkpoint_00000200

Samples "a handwritten digit k" (k = 0..9) from the teacher (Euler, 50 steps, CFG at the student's
distillation w) and from the student (1 and 2 steps) with the same seeds, and scores them with the
classifier of benchmarks/digits_quality.py: class accuracy and the Frechet distance of its hidden features
to the real digits. Targets (issue: sCD): the 2-step student within 15% of the teacher's Frechet distance
and within 5 points of its accuracy, the 1-step student within 30%. The distillation compute is reported
as a fraction of the teacher's: training wall-clock (same machine) and samples seen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_quality import evaluate, train_classifier  # noqa: E402


def run_info(directory: Path) -> dict:
    from orchestration.sample import checkpoint_config
    from trainer.checkpoint import META, check_complete

    directory = check_complete(directory)
    meta = json.loads((directory / META).read_text())
    cfg = checkpoint_config(directory)
    return {"cfg": cfg, "step": meta["step"], "seconds": meta.get("train_seconds"),
            "samples": meta["step"] * cfg.train.global_batch_size}


def main(argv=None) -> int:
    from orchestration.sample import sample_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="the pretraining checkpoint")
    parser.add_argument("--student", required=True, help="the distillation checkpoint")
    parser.add_argument("--num-per-prompt", type=int, default=50)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    teacher, student = run_info(Path(args.teacher)), run_info(Path(args.student))
    w = student["cfg"].distill.cfg_scale
    clf, held_out = train_classifier()
    prompts = [f"a handwritten digit {k}" for k in range(10)]
    rows = {}
    for label, uri, steps in ((f"teacher, Euler {args.teacher_steps} steps", args.teacher, args.teacher_steps),
                              ("student, 1 step", args.student, 1), ("student, 2 steps", args.student, 2)):
        images, expanded = sample_checkpoint(uri, prompts, args.num_per_prompt, args.seed, steps=steps, cfg_scale=w,
                                             device="cpu")
        rows[label] = evaluate(images.numpy(), expanded, clf)
    base = rows[f"teacher, Euler {args.teacher_steps} steps"]
    print(f"CFG w = {w:g}, {10 * args.num_per_prompt} samples each; classifier held-out accuracy {held_out:.3f}")
    print(f"{'sampler':<26}{'accuracy':>9}{'Frechet':>9}{'FD / teacher':>14}{'target':>10}{'met':>5}")
    targets = {"student, 1 step": 1.30, "student, 2 steps": 1.15}
    for label, r in rows.items():
        ratio = r["frechet"] / base["frechet"]
        target = targets.get(label)
        met = "" if target is None else ("yes" if ratio <= target and (
            label != "student, 2 steps" or base["accuracy"] - r["accuracy"] <= 0.05) else "no")
        shown = "" if target is None else f"<= {target:.2f}"
        print(f"{label:<26}{r['accuracy']:>9.3f}{r['frechet']:>9.3f}{ratio:>14.3f}{shown:>10}{met:>5}")
    print(f"distillation: {student['step']} steps, {student['samples']:,} samples "
          f"({student['samples'] / teacher['samples']:.1%} of the teacher's {teacher['samples']:,})")
    if teacher["seconds"] and student["seconds"]:
        print(f"training wall-clock: student {student['seconds']:.0f} s, teacher {teacher['seconds']:.0f} s "
              f"({student['seconds'] / teacher['seconds']:.1%} of the teacher's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
