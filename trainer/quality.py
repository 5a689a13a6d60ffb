"""Sample quality of the digits demo: how far generated digits are from the real ones, in the features of a
classifier trained on the real digits (scikit-learn's bundled 1,797 images).

The Frechet distance between the classifier's hidden features of the samples and of the real digits ranks
samplers by what they generate, where a validation loss averaged over evenly spaced t would weight t
uniformly and so favour the uniform timestep sampler. Used by the job at each evaluation
(``sample.quality=digits``) and by benchmarks/digits_quality.py.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path

import numpy as np


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


class DigitsClassifier:
    """The trained MLP's weights as arrays: predictions and hidden features without scikit-learn's object."""

    def __init__(self, coefs: list[np.ndarray], intercepts: list[np.ndarray]):
        self.coefs_, self.intercepts_ = coefs, intercepts

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (hidden_features(self, x) @ self.coefs_[1] + self.intercepts_[1]).argmax(1)

    def save(self, path: Path) -> None:
        np.savez(path, w0=self.coefs_[0], b0=self.intercepts_[0], w1=self.coefs_[1], b1=self.intercepts_[1])

    @classmethod
    def load(cls, path: Path) -> "DigitsClassifier":
        with np.load(path, allow_pickle=False) as f:
            return cls([f["w0"], f["w1"]], [f["b0"], f["b1"]])


@functools.lru_cache(maxsize=1)
def classifier(seed: int = 0) -> DigitsClassifier:
    """The digits classifier: trained once per machine (seconds on an idle core, minutes on a loaded one) and
    kept as plain arrays in the temporary directory, so every later process, such as each trial of a sweep,
    loads it at once."""
    import sklearn

    cached = Path(tempfile.gettempdir()) / f"flowscale-digits-classifier-{sklearn.__version__}-{seed}.npz"
    if cached.exists():
        return DigitsClassifier.load(cached)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny matrices: BLAS threads only contend (10x slower on a loaded machine)
        clf = train_classifier(seed)[0]
    model = DigitsClassifier(list(clf.coefs_), list(clf.intercepts_))
    scratch = cached.with_name(f"{cached.stem}.{os.getpid()}.npz")
    model.save(scratch)
    scratch.replace(cached)  # atomic: a concurrent reader sees the whole file or none
    return model


def score_digits(images, prompts) -> dict[str, float]:
    """``frechet`` and ``accuracy`` of digit images (N, 1, 8, 8) in [0, 1] generated for ``prompts``."""
    result = evaluate(np.asarray(images, dtype=np.float64), prompts, classifier())
    return {"frechet": result["frechet"], "accuracy": result["accuracy"]}
