"""The demo text encoder: deterministic, and the digit's word is a shared token across templates."""

from __future__ import annotations

import subprocess
import sys

import torch

from dataloaders.prepare import DIGIT_TEMPLATES
from dataloaders.text_encoders import DemoTextEncoder


def word_vector(encoder: DemoTextEncoder, caption: str, word: str) -> torch.Tensor:
    """The token of `word` in `caption`, with the position code taken out."""
    tokens, _ = encoder.encode([caption])
    i = encoder.words(caption).index(word)
    return tokens[0, i] - encoder.position_scale * torch.from_numpy(encoder._positions[i])


def test_every_template_shares_the_token_naming_the_digit():
    enc = DemoTextEncoder()
    for k in range(10):
        vectors = [word_vector(enc, t.format(k=k), str(k)) for t in DIGIT_TEMPLATES]
        assert all(torch.allclose(v, vectors[0], atol=1e-6) for v in vectors)
    three, eight = word_vector(enc, "digit 3", "3"), word_vector(enc, "digit 8", "8")
    assert torch.nn.functional.cosine_similarity(three, eight, dim=0).abs() < 0.5


def test_shapes_and_padding():
    tokens, pooled = DemoTextEncoder(tokens=16, width=64).encode(["a handwritten digit 7", ""])
    assert tokens.shape == (2, 16, 64) and pooled.shape == (2, 64) and tokens.dtype == torch.float32
    assert torch.equal(tokens[0, 4:], tokens[1, 4:])  # padding positions do not depend on the caption
    assert not torch.equal(pooled[0], pooled[1])


def test_encoding_is_the_same_in_another_process():
    code = ("from dataloaders.text_encoders import DemoTextEncoder;"
            "print(DemoTextEncoder().encode(['the number 5, written by hand'])[0].sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = DemoTextEncoder().encode(["the number 5, written by hand"])[0].sum().item()
    assert float(out) == here
