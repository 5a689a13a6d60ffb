"""Are the demo's samples the digits they were prompted for?

    python benchmarks/digits_quality.py --checkpoint ~/flowscale/runs/RUN/checkpoint_00002000
    python benchmarks/digits_quality.py --npz samples.npz        # images + prompts from orchestration/sample.py

A classifier trained on the real digits (scikit-learn's bundled 1,797 images; an MLP, about 97% accurate
on held-out real digits) labels samples generated for "a handwritten digit k"; the table gives the share
assigned to class k, per digit and overall, and the Frechet distance between the classifier's hidden
features of the samples and of the real digits (lower is closer). Target of the pretraining demo: at
least 80% accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.quality import evaluate, train_classifier  # noqa: E402


def format_table(result: dict, label: str, classifier_accuracy: float) -> str:
    lines = [f"{'samples':<28}{'n':>6}{'accuracy':>10}{'Frechet':>10}   per digit 0..9"]
    digits = " ".join(f"{result['per_digit'].get(k, float('nan')):.2f}" for k in range(10))
    lines.append(f"{label:<28}{result['n']:>6}{result['accuracy']:>10.3f}{result['frechet']:>10.3f}   {digits}")
    lines.append(f"(classifier: MLP on real digits, held-out accuracy {classifier_accuracy:.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a pretraining checkpoint to sample from")
    src.add_argument("--npz", help="samples saved by orchestration/sample.py --out-npz")
    parser.add_argument("--num-per-prompt", type=int, default=50)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    clf, held_out = train_classifier()
    if args.npz:
        data = np.load(args.npz, allow_pickle=False)
        images, prompts, label = data["images"], list(data["prompts"]), Path(args.npz).name
    else:
        from orchestration.sample import sample_checkpoint

        prompts = [f"a handwritten digit {k}" for k in range(10)]
        images_t, prompts = sample_checkpoint(args.checkpoint, prompts, args.num_per_prompt, args.seed,
                                              steps=args.steps, cfg_scale=args.cfg, device="cpu")
        images, label = images_t.numpy(), f"Euler {args.steps} steps, cfg {args.cfg:g}"
    print(format_table(evaluate(images, prompts, clf), label, held_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
