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
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_classifier(seed: int = 0):
    """(classifier, held-out accuracy) on real digits as images in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = digits.images.reshape(len(digits.images), -1) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=seed)
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=seed).fit(x_tr, y_tr)
    clf.held_out_accuracy = float(clf.score(x_te, y_te))
    clf.fit(x, digits.target)  # the final classifier sees every real digit
    return clf, clf.held_out_accuracy


def hidden_features(clf, x: np.ndarray) -> np.ndarray:
    """The MLP's ReLU hidden layer: a feature space trained to separate digits."""
    return np.maximum(0, x @ clf.coefs_[0] + clf.intercepts_[0])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    # Features that never fire make the covariances singular; a tiny ridge keeps the square root defined.
    ridge = 1e-6 * np.eye(a.shape[1])
    s_a, s_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = np.real(linalg.sqrtm(s_a @ s_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def prompted_labels(prompts) -> np.ndarray:
    labels = []
    for p in prompts:
        found = re.findall(r"\d", str(p))
        if len(found) != 1:
            raise ValueError(f"prompt {p!r} does not name exactly one digit")
        labels.append(int(found[0]))
    return np.array(labels)


def evaluate(images: np.ndarray, prompts, clf) -> dict:
    """images: (N, 1, 8, 8) in [0, 1]; prompts: the caption of each image."""
    from sklearn.datasets import load_digits

    if images.ndim != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"expected digit images of shape (N, 1, 8, 8), got {images.shape}")
    x = images.reshape(len(images), -1).astype(np.float64)
    want = prompted_labels(prompts)
    got = clf.predict(x)
    per_digit = {int(k): float((got[want == k] == k).mean()) for k in np.unique(want)}
    real = load_digits().images.reshape(-1, 64) / 16.0
    return {
        "accuracy": float((got == want).mean()),
        "per_digit": per_digit,
        "frechet": frechet_distance(hidden_features(clf, x), hidden_features(clf, real)),
        "n": len(x),
    }


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
