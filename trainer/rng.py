"""Per-rank random streams: noise, timesteps and text dropout each draw from their own generator.

Each stream is reseeded at every step from (seed, rank, stream, step): ranks draw different noise, a
run is reproducible bit for bit, a resumed run draws exactly what the uninterrupted one would have
(no generator state to checkpoint), and one stream's consumption never shifts another's.
"""

from __future__ import annotations

import hashlib

import torch

STREAMS = ("noise", "timesteps", "dropout")


def stream_seed(seed: int, rank: int, stream: str, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{rank}/{stream}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


class RankStreams:
    def __init__(self, seed: int, rank: int, device: torch.device | str = "cpu"):
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.generators = {name: torch.Generator(device=self.device) for name in STREAMS}
        self.at_step(0)

    def at_step(self, step: int) -> "RankStreams":
        for name, g in self.generators.items():
            g.manual_seed(stream_seed(self.seed, self.rank, name, step))
        return self

    def __getitem__(self, name: str) -> torch.Generator:
        return self.generators[name]
