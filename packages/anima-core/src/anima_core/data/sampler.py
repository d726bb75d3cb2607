"""Batch order: per (seed, epoch), group samples by bucket, shuffle within each bucket, cut into batches (the short
tail of each bucket kept, the reference's v0.8.3 fix), shuffle the batches, and make the count a multiple of the
number of processes so every rank gets the same number of disjoint batches."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Hashable, Sequence


def epoch_rng(kind: str, seed: int, *parts: int) -> random.Random:
    """A generator that depends only on its arguments (str seeds hash with SHA-512, stable across Python 3
    versions and processes), unlike seed+epoch sums where (seed 1, epoch 0) = (seed 0, epoch 1)."""
    return random.Random(":".join([kind, str(seed), *map(str, parts)]))


def bucket_batches(buckets: Sequence[Hashable], batch_size: int) -> int:
    counts: dict[Hashable, int] = defaultdict(int)
    for b in buckets:
        counts[b] += 1
    return sum(math.ceil(n / batch_size) for n in counts.values())


def batches_per_rank(buckets: Sequence[Hashable], batch_size: int, world_size: int = 1) -> int:
    return math.ceil(bucket_batches(buckets, batch_size) / world_size)


def plan_epoch(buckets: Sequence[Hashable], batch_size: int, seed: int, epoch: int,
               world_size: int = 1) -> list[list[int]]:
    """Every batch of the epoch as lists of sample indices (``buckets[i]`` is sample i's bucket); rank r takes
    ``plan[r::world_size]``.

    When the count is not a multiple of ``world_size``, the largest batches are split in two (never dropped, never
    mixed across buckets) until it is; only when every batch is a single sample are the first batches repeated."""
    rng = epoch_rng("order", seed, epoch)
    by_bucket: dict[Hashable, list[int]] = defaultdict(list)
    for index, bucket in enumerate(buckets):
        by_bucket[bucket].append(index)
    plan: list[list[int]] = []
    for bucket in sorted(by_bucket, key=repr):  # a fixed order before shuffling: dicts keep insertion order only
        members = by_bucket[bucket]
        rng.shuffle(members)
        plan += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(plan)
    target = math.ceil(len(plan) / world_size) * world_size
    while len(plan) < target:
        largest = max(range(len(plan)), key=lambda i: (len(plan[i]), -i))
        batch = plan[largest]
        if len(batch) < 2:  # fewer samples than processes: repeat batches in order
            real = len(plan)
            plan += [list(plan[i % real]) for i in range(target - real)]
            break
        half = (len(batch) + 1) // 2
        plan[largest:largest + 1] = [batch[:half], batch[half:]]
    return plan
