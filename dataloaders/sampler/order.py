"""The global sample order: a function of (dataset, seed, partitions, global batch) only.

Nothing here depends on the number of ranks, nodes or workers; that is what makes resumption elastic. The
unit of reading is the record batch (a whole shard for datasets without a record-batch index).

1. **Partitions** (fixed for the run; mosaicml-streaming's "canonical nodes"). The shards are put in a
   seeded order, their record batches laid end to end, and the sequence is cut at record-batch boundaries
   into ``P`` spans of nearly equal rows. A node serves whole partitions, so it reads the same ~1/N of the
   dataset every epoch (its cache stays warm).
2. **One pass of a partition** (per epoch): its record batches are ordered so that each shard's batches are
   spread evenly over the pass (random phase per shard, random order within it), cut into blocks of about
   ``block_size`` samples at record-batch boundaries, and within a block the shards' rows are interleaved
   the same way (each record batch's rows permuted, its shard's batches taken one after another). Any
   window of w consecutive samples therefore draws from about min(w, shards in the block) shards, more
   than a uniform permutation gives, while a record batch is only needed during its block. Passes of
   ``S = max(partition rows)`` positions: a partition that is a few rows short repeats as many samples of
   its last block, so all partitions advance in lockstep.
3. **Interleaving.** Global batch ``i`` (``G`` samples) is ``P`` chunks of ``C = G / P``: chunk ``p`` is
   partition ``p``'s pass positions ``[i*C, (i+1)*C)``. Node ``n`` of ``N`` takes the contiguous slice
   ``[n*G/N, (n+1)*G/N)`` of every batch, i.e. exactly partitions ``[n*P/N, (n+1)*P/N)`` when ``N`` divides
   ``P``. With ``P = 1`` the stream is the single pass, epochs end to end, and ``G`` plays no role.

Stream position ``q`` (counted from ``base``, where the current ``G`` took over; see ``StreamingLoader``)
is pass position ``k = base/P + (q - base) // G * C + (q - base) % C`` of partition ``(q - base) % G // C``;
``k // S`` is the epoch. Every pass is a permutation of the partition's samples, so every epoch holds each
sample at least once, exactly once when all partitions have ``S`` rows (with ``P = 1``: always).
Permutations are computed per pass and per block on demand and cached, so memory does not grow with the
number of epochs.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_MASK = (1 << 63) - 1
_ASSIGN, _PASS, _BLOCK = 0, 1, 2  # independent random streams


def spread(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation that spreads each group's items evenly over the sequence, keeping their order inside
    the group: item j of a group of n gets the key (j + phase) / n, with one random phase per group."""
    labels, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    by_group = np.argsort(inverse, kind="stable")
    rank = np.empty(len(groups), np.int64)
    rank[by_group] = np.arange(len(groups)) - np.repeat(np.cumsum(counts) - counts, counts)
    phase = rng.random(len(labels))
    return np.argsort((rank + phase[inverse]) / counts[inverse], kind="stable")


class GlobalOrder:
    def __init__(self, batch_rows: list[int] | np.ndarray, seed: int, shuffle: bool = True, block_size: int = 4096,
                 *, batch_shards: np.ndarray | None = None, partitions: int = 1, global_batch_size: int | None = None,
                 base: int = 0):
        """``batch_rows``: rows of each record batch; ``batch_shards``: the shard of each (default: each its
        own shard, as for a dataset without a record-batch index)."""
        if block_size < 1:
            raise ValueError(f"shuffle block size must be >= 1, got {block_size}")
        self.batch_rows = np.asarray(batch_rows, dtype=np.int64)
        self.batch_shards = (np.arange(len(self.batch_rows)) if batch_shards is None
                             else np.asarray(batch_shards, dtype=np.int64))
        if partitions < 1 or partitions > len(self.batch_rows):
            raise ValueError(f"data.partitions={partitions} must be between 1 and the dataset's "
                             f"{len(self.batch_rows)} record batches")
        if partitions > 1 and (global_batch_size is None or global_batch_size % partitions):
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not divisible by the {partitions} data partitions "
                f"(data.partitions, or the node count of the run that started this data order); every global "
                f"batch takes the same number of samples from each partition"
            )
        if base % partitions:
            raise ValueError(f"order base {base} is not a multiple of the {partitions} partitions")
        self.seed = int(seed) & _MASK
        self.shuffle = shuffle
        self.block_size = block_size
        self.partitions = partitions
        self.global_batch_size = global_batch_size
        self.chunk = global_batch_size // partitions if partitions > 1 else None
        self.base = base
        self.dataset_samples = int(self.batch_rows.sum())
        # Row offset of each record batch inside its shard (batches of a shard are listed in order).
        ends = np.cumsum(self.batch_rows)
        shard_start = np.r_[True, self.batch_shards[1:] != self.batch_shards[:-1]]
        self.batch_first_row = ends - self.batch_rows - np.maximum.accumulate(np.where(shard_start, ends - self.batch_rows, 0))
        self.members = self._assign()
        self.partition_of = np.empty(len(self.batch_rows), np.int64)
        for p, m in enumerate(self.members):
            self.partition_of[m] = p
        self.partition_rows = np.array([self.batch_rows[m].sum() for m in self.members], np.int64)
        self.span = int(self.partition_rows.max())  # S: positions per pass of every partition
        self.num_samples = self.partitions * self.span  # stream positions per epoch
        self._make_caches()

    def _make_caches(self) -> None:
        self._pass = lru_cache(maxsize=4 * self.partitions)(self._pass_layout)
        self._block = lru_cache(maxsize=64)(self._block_layout)

    # Sent to worker processes as plain data; each process rebuilds its own caches.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pass", "_block")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_caches()

    def with_batch(self, global_batch_size: int, base: int, partitions: int | None = None) -> "GlobalOrder":
        """The same order with another global batch (from stream position ``base`` on) or partition count."""
        return GlobalOrder(self.batch_rows, self.seed, self.shuffle, self.block_size, batch_shards=self.batch_shards,
                           partitions=partitions or self.partitions, global_batch_size=global_batch_size, base=base)

    def _rng(self, stream: int, *keys: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(stream, *keys)))

    # ---------------------------------------------------------------------------------------- layout
    def _assign(self) -> list[np.ndarray]:
        """Record batches of each partition: contiguous spans of the seeded shard order, balanced by rows."""
        shards = np.unique(self.batch_shards)
        shard_order = self._rng(_ASSIGN).permutation(shards) if self.shuffle else shards
        rank = np.empty(shards.max() + 1, np.int64)
        rank[shard_order] = np.arange(len(shard_order))
        sequence = np.argsort(rank[self.batch_shards], kind="stable")
        ends = np.cumsum(self.batch_rows[sequence])
        cuts: list[int] = []
        for j in range(1, self.partitions):
            target = ends[-1] * j / self.partitions
            i = int(np.searchsorted(ends, target))  # the first batch that reaches the target...
            cut = i + 1 if i == 0 or ends[i] - target <= target - ends[i - 1] else i  # ...or the one before
            cuts.append(min(max(cut, cuts[-1] + 1 if cuts else 1), len(sequence) - self.partitions + j))
        return np.split(sequence, cuts)

    def _pass_layout(self, partition: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(record batches of one pass in order, the pass position where each block starts and ends, the
        index of each block's first record batch, the argsort of the first array)."""
        members = self.members[partition]
        if self.shuffle:
            rng = self._rng(_PASS, partition, epoch)
            shuffled = members[rng.permutation(len(members))]
            members = shuffled[spread(self.batch_shards[shuffled], rng)]
        starts = np.cumsum(self.batch_rows[members]) - self.batch_rows[members]
        block = starts // self.block_size
        first = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
        return members, np.r_[starts[first], starts[-1] + self.batch_rows[members[-1]]], first, np.argsort(members)

    def _block_layout(self, partition: int, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Every sample of block b of a pass as (record batch, row in it), in pass order."""
        members, _, first, _ = self._pass(partition, epoch)
        batches = members[first[b]:first[b + 1] if b + 1 < len(first) else len(members)]
        rows = self.batch_rows[batches]
        batch = np.repeat(batches, rows)
        row = np.arange(len(batch)) - np.repeat(np.cumsum(rows) - rows, rows)
        if self.shuffle:
            rng = self._rng(_BLOCK, partition, epoch, b)
            within = np.lexsort((rng.random(len(batch)), np.repeat(np.arange(len(batches)), rows)))
            batch, row = batch[within], row[within]  # each record batch's rows permuted
            at = spread(self.batch_shards[batch], rng)
            batch, row = batch[at], row[at]
        return batch, row

    # -------------------------------------------------------------------------------------- positions
    def pass_position(self, position: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions as (partition, position in that partition's stream of passes)."""
        q = np.asarray(position, dtype=np.int64)
        if self.partitions == 1:
            return np.zeros_like(q), q
        if np.any(q < self.base):
            raise ValueError(f"stream position {int(q.min())} lies before this order's base {self.base}")
        rnd, within = np.divmod(q - self.base, self.global_batch_size)
        partition, c = np.divmod(within, self.chunk)
        return partition, self.base // self.partitions + rnd * self.chunk + c

    def partitions_of_slice(self, lo: int, hi: int) -> list[int]:
        """The partitions that supply positions [lo, hi) of every global batch (a node's slice)."""
        if self.partitions == 1:
            return [0]
        return list(range(lo // self.chunk, (hi - 1) // self.chunk + 1))

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream positions [start, start + count) as (epoch, record batch, row in it) arrays."""
        partition, k = self.pass_position(np.arange(start, start + count, dtype=np.int64))
        epochs, offset = np.divmod(k, self.span)
        batches = np.empty(count, np.int64)
        rows = np.empty(count, np.int64)
        for p in np.unique(partition):
            for epoch in np.unique(epochs[partition == p]):
                sel = np.flatnonzero((partition == p) & (epochs == epoch))
                _, block_starts, _, _ = self._pass(int(p), int(epoch))
                o = offset[sel]
                n = block_starts[-1]  # this partition's rows; positions past them repeat its last block
                last = block_starts[-2]
                o = np.where(o < n, o, last + (o - n) % (n - last))
                blocks = np.searchsorted(block_starts, o, side="right") - 1
                for b in np.unique(blocks):
                    at = blocks == b
                    block_batch, block_row = self._block(int(p), int(epoch), int(b))
                    inside = o[at] - block_starts[b]
                    batches[sel[at]] = block_batch[inside]
                    rows[sel[at]] = block_row[inside]
        return epochs, batches, rows

    def to_shards(self, batches: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(record batch, row in it) as (shard, row in shard)."""
        return self.batch_shards[batches], self.batch_first_row[batches] + rows

    def epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole order of one epoch as (shard ids, rows in shard); for tests and quality measurements."""
        _, batches, rows = self.locate(epoch * self.num_samples, self.num_samples)
        return self.to_shards(batches, rows)

    def next_use(self, batches: np.ndarray, position: int, partitions: list[int]) -> np.ndarray:
        """Pass positions from ``position`` until each record batch is next read by a reader of
        ``partitions`` (inf: never by it); a bounded cache evicts the largest first. Exact inside the current
        block; for a later block, its start (at most a block early)."""
        batches = np.asarray(batches, dtype=np.int64)
        _, k = self.pass_position(int(position))
        epoch, now = divmod(int(k), self.span)
        out = np.full(len(batches), np.inf)
        mine = np.isin(self.partition_of[batches], partitions)
        for p in np.unique(self.partition_of[batches[mine]]):
            sel = np.flatnonzero(mine & (self.partition_of[batches] == p))
            block, block_starts = self._blocks_of(batches[sel], int(p), epoch)
            current = int(np.searchsorted(block_starts, now, side="right") - 1)
            distance = np.where(block > current, block_starts[block] - now, np.inf)
            if np.any(block == current):  # rows of the current block still ahead of `now`
                ahead = self._block(int(p), epoch, current)[0][now - block_starts[current]:]
                seen, first = np.unique(ahead, return_index=True)
                at = np.flatnonzero(block == current)
                hit = np.searchsorted(seen, batches[sel[at]])
                found = (hit < len(seen)) & (seen[np.minimum(hit, len(seen) - 1)] == batches[sel[at]])
                distance[at[found]] = first[hit[found]]
            later = np.isinf(distance)  # done this pass: its block in the next one
            if np.any(later):
                block, block_starts = self._blocks_of(batches[sel[later]], int(p), epoch + 1)
                distance[later] = self.span - now + block_starts[block]
            out[sel] = distance
        return out

    def _blocks_of(self, batches: np.ndarray, partition: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The block of each record batch in a pass of its partition, and the pass's block starts."""
        members, block_starts, first, by_id = self._pass(partition, epoch)
        slot = by_id[np.searchsorted(members[by_id], batches)]
        return np.searchsorted(first, slot, side="right") - 1, block_starts


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


def shards_per_batch(shards: np.ndarray, global_batch_size: int, num_shards: int) -> float:
    """Distinct shards per global batch over min(batch, shards): 1 when no batch draws twice from a shard
    while others go unused (the issue-14 measure of shuffle quality)."""
    batches = [len(np.unique(shards[i:i + global_batch_size]))
               for i in range(0, len(shards) - global_batch_size + 1, global_batch_size)]
    return float(np.mean(batches)) / min(global_batch_size, num_shards)


def _hypergeom_absent(sizes: np.ndarray, n: int, window: int) -> np.ndarray:
    """P(no sample of a shard of each size is among `window` drawn without replacement from n)."""
    out = np.ones_like(sizes)
    for i in range(window):
        out *= np.clip((n - sizes - i) / (n - i), 0.0, 1.0)
    return out
