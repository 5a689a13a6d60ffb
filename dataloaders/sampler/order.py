"""The global sample order: one sequence per epoch, a function of (dataset, seed, epoch) only.

Nothing here depends on the number of ranks or workers; that is what makes resumption elastic. The epochs
are laid end to end into one infinite stream, and a position ``p`` in it is sample ``p mod N`` of epoch
``p // N``. Batches may straddle an epoch boundary, so no sample is ever dropped.

Shuffling an epoch (mosaicml/streaming's "block" idea, simplified):
1. permute the shards (seed, epoch),
2. lay their rows end to end,
3. cut that sequence into blocks of ``block_size`` samples and permute inside each block (seed, epoch, block).
A window of ``block_size`` consecutive positions therefore touches about ``block_size / shard_rows + 1``
shards, which bounds what a reader must hold at once; larger blocks mix better. Block permutations are
computed on demand, so an epoch of billions of samples costs no memory up front.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_MASK = (1 << 63) - 1


class GlobalOrder:
    def __init__(self, shard_rows: list[int], seed: int, shuffle: bool = True, block_size: int = 4096):
        if block_size < 1:
            raise ValueError(f"shuffle block size must be >= 1, got {block_size}")
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.num_samples = int(self.shard_rows.sum())
        self.seed = int(seed) & _MASK
        self.shuffle = shuffle
        self.block_size = block_size
        self._make_caches()

    def _make_caches(self) -> None:
        self._epoch_layout = lru_cache(maxsize=2)(self._layout)
        self._block_perm = lru_cache(maxsize=64)(self._permutation)

    # Sent to spawn workers as plain data; each process rebuilds its own caches.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_epoch_layout", "_block_perm")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_caches()

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids in epoch order, the concatenated-sequence start of each of them)."""
        order = self._rng(epoch, 0).permutation(len(self.shard_rows)) if self.shuffle else np.arange(len(self.shard_rows))
        starts = np.concatenate([[0], np.cumsum(self.shard_rows[order])[:-1]])
        return order, starts

    def _permutation(self, epoch: int, block: int) -> np.ndarray:
        length = min(self.block_size, self.num_samples - block * self.block_size)
        return self._rng(epoch, 1, block).permutation(length)

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream positions [start, start + count) as (epoch, shard id, row in shard) arrays."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs = pos // self.num_samples
        offset = pos % self.num_samples
        shards = np.empty(count, np.int64)
        rows = np.empty(count, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            k = offset[sel]
            if self.shuffle:
                blocks = k // self.block_size
                seq = np.empty_like(k)
                for b in np.unique(blocks):
                    in_b = blocks == b
                    seq[in_b] = b * self.block_size + self._block_perm(int(epoch), int(b))[k[in_b] - b * self.block_size]
            else:
                seq = k
            order, starts = self._epoch_layout(int(epoch))
            slot = np.searchsorted(starts, seq, side="right") - 1
            shards[sel] = order[slot]
            rows[sel] = seq - starts[slot]
        return epochs, shards, rows

    def epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole order of one epoch as (shard ids, rows); for tests and quality measurements."""
        _, shards, rows = self.locate(epoch * self.num_samples, self.num_samples)
        return shards, rows


def shuffle_quality(shards: np.ndarray, rows: np.ndarray, shard_rows: list[int], window: int) -> dict[str, float]:
    """How well an epoch order mixes, each figure in [0, 1] with 1 = as good as a uniform permutation.

    - ``shards_per_window``: distinct shards among ``window`` consecutive samples, over what a uniform
      permutation would give (low = batches drawn from few shards, i.e. correlated samples).
    - ``displacement``: mean |epoch position - position in the unshuffled dataset|, over N/3 (its value
      for a uniform permutation).
    """
    n = len(shards)
    sizes = np.asarray(shard_rows, dtype=np.float64)
    # Expected distinct shards among `window` samples drawn uniformly without replacement.
    expected = float(np.sum(1.0 - _hypergeom_absent(sizes, n, window)))
    seen = [len(np.unique(shards[i:i + window])) for i in range(0, n - window + 1, window)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    original = starts[shards] + rows
    displacement = float(np.mean(np.abs(original - np.arange(n)))) / (n / 3.0)
    return {"shards_per_window": float(np.mean(seen)) / expected, "displacement": displacement}


def _hypergeom_absent(sizes: np.ndarray, n: int, window: int) -> np.ndarray:
    """P(no sample of a shard of each size is among `window` drawn without replacement from n)."""
    out = np.ones_like(sizes)
    for i in range(window):
        out *= np.clip((n - sizes - i) / (n - i), 0.0, 1.0)
    return out
