"""Text encoders, recorded in a dataset's manifest so the sampler can encode prompts the same way.

``DemoTextEncoder`` stands in for CLIP/T5 in the digits demo: frozen, deterministic, built in (no
download). Each lower-cased word gets a fixed random vector derived from a hash of the word alone, so
"a handwritten digit 3" and "the number 3, written by hand" share the token vector that names the digit,
wherever it stands; that shared token is what a small diffusion model can learn to condition on. A small
sinusoidal position code keeps word order visible, padding positions hold a fixed non-zero pad vector
(as T5 padding outputs are non-zero), and the pooled vector is the mean of the word vectors.

``load_text_encoder(manifest_url)`` rebuilds whichever encoder a dataset records
(``{"name": ..., "settings": {...}}``); real VAE/CLIP/T5 encoders live in ``dataloaders.encoders``.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch

_WORD = re.compile(r"[a-z0-9]+")


class DemoTextEncoder:
    name = "demo"

    def __init__(self, tokens: int = 16, width: int = 64, seed: int = 0, position_scale: float = 0.1):
        self.tokens = tokens
        self.width = width
        self.seed = seed
        self.position_scale = position_scale
        self._vectors: dict[str, np.ndarray] = {}
        pos = np.arange(tokens)[:, None] / np.power(10000.0, np.arange(0, width, 2)[None] / width)
        self._positions = np.zeros((tokens, width), np.float32)
        self._positions[:, 0::2] = np.sin(pos)
        self._positions[:, 1::2] = np.cos(pos)[:, : width // 2]
        self._pad = self._vector("\x00pad")

    def describe(self) -> dict:
        """What the manifest records: enough to rebuild this exact encoder."""
        return {"name": self.name, "settings": {"tokens": self.tokens, "width": self.width, "seed": self.seed,
                                                 "position_scale": self.position_scale}}

    def _vector(self, word: str) -> np.ndarray:
        v = self._vectors.get(word)
        if v is None:
            # blake2b, not hash(): Python's str hash is salted per process.
            key = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng([self.seed, key]).standard_normal(self.width).astype(np.float32)
            self._vectors[word] = v
        return v

    def words(self, caption: str) -> list[str]:
        return _WORD.findall(caption.lower())[: self.tokens]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (tokens (N, tokens, width), pooled (N, width)), float32."""
        tokens = np.empty((len(captions), self.tokens, self.width), np.float32)
        pooled = np.empty((len(captions), self.width), np.float32)
        for i, caption in enumerate(captions):
            vectors = [self._vector(w) for w in self.words(caption)]
            n = len(vectors)
            tokens[i, :n] = np.stack(vectors) if vectors else 0.0
            tokens[i, n:] = self._pad
            tokens[i] += self.position_scale * self._positions
            pooled[i] = np.mean(vectors, axis=0) if vectors else self._pad
        return torch.from_numpy(tokens), torch.from_numpy(pooled)


_ENCODERS = {DemoTextEncoder.name: DemoTextEncoder}


def text_encoder_from_record(record: dict, *, where: str = "manifest"):
    """The encoder a manifest's ``text_encoder`` record describes."""
    name = record.get("name")
    if name == "sd3":  # text encoders only: prompts need no VAE
        from dataloaders.encoders import SD3Encoder

        return SD3Encoder.from_local(**record.get("settings", {}))
    if name not in _ENCODERS:
        raise ValueError(f"{where} records text encoder {name!r}; known: {sorted(_ENCODERS) + ['sd3']}")
    return _ENCODERS[name](**record.get("settings", {}))


def load_text_encoder(url: str, storage_options: dict | None = None):
    """Rebuild the text encoder that encoded the dataset at ``url`` (its root or its manifest)."""
    from dataloaders.dataset import open_dataset

    ds = open_dataset(url, storage_options=storage_options)
    if not ds.manifest.text_encoder:
        raise ValueError(f"dataset {ds.manifest.url} records no text encoder (key 'text_encoder' is empty)")
    return text_encoder_from_record(ds.manifest.text_encoder, where=f"dataset {ds.manifest.url}")
