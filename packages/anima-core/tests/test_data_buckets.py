"""Aspect-ratio buckets and the per-epoch batch order (pure arithmetic: no images, no models)."""

import math
from collections import Counter

import pytest

from anima_core.data.buckets import assign_bucket, cover_size, crop_offset, make_buckets, needs_upscale
from anima_core.data.sampler import batches_per_rank, plan_epoch


@pytest.mark.parametrize("base,step,limit", [(1024, 64, 2.0), (1024, 16, 2.0), (512, 64, 2.0), (768, 32, 1.5),
                                             (64, 16, 2.0), (1040, 64, 2.0)])
def test_buckets_respect_grid_area_and_ratio_and_are_mirrored(base, step, limit):
    buckets = make_buckets(base, step, limit)
    assert (base, base) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert (w, h) == (base, base) or (w % step == 0 and h % step == 0)
        assert w * h <= base * base
        assert max(w, h) / min(w, h) <= limit + 1e-9
        assert (h, w) in buckets


def test_buckets_take_the_largest_height_for_each_width():
    buckets = make_buckets(1024, 64, 2.0)

    def full(w, h):  # one more grid row of height would exceed the area or the ratio limit
        return w * (h + 64) > 1024 * 1024 or max(w, h + 64) / min(w, h + 64) > 2.0

    # each bucket is the tallest for its width, or the mirror of one that is (so tall and wide sets match)
    assert all(full(w, h) or full(h, w) for w, h in buckets)
    assert len(buckets) == len(set(buckets)) > 10
    assert (832, 1216) in buckets and (1216, 832) in buckets  # the SDXL-style portrait size exists


def test_base_below_the_step_still_has_its_square_bucket():
    assert make_buckets(48, 64, 2.0) == ((48, 48),)


@pytest.mark.parametrize("size,expected", [((1000, 1000), (1024, 1024)), ((832, 1216), (832, 1216)),
                                           ((1216, 832), (1216, 832)), ((4000, 1000), (1408, 704))])
def test_image_goes_to_the_closest_ratio_bucket(size, expected):
    assert assign_bucket(*size, make_buckets(1024, 64, 2.0)) == expected


def test_tall_and_wide_images_are_treated_symmetrically():
    buckets = make_buckets(1024, 64, 2.0)
    for w, h in [(900, 1300), (700, 1000), (1000, 1900), (1024, 1100)]:
        tall = assign_bucket(w, h, buckets)
        wide = assign_bucket(h, w, buckets)
        assert tall == (wide[1], wide[0])


def test_ratio_ties_go_to_the_larger_area():
    assert assign_bucket(10, 10, ((32, 32), (64, 64), (48, 48))) == (64, 64)
    assert assign_bucket(10, 10, ((64, 64), (32, 32))) == (64, 64)  # not simply the first listed


def test_cover_size_keeps_aspect_and_covers_the_bucket():
    for (w, h), bucket in [((100, 50), (64, 32)), ((50, 100), (48, 80)), ((640, 480), (64, 48)),
                           ((30, 20), (64, 48))]:
        rw, rh = cover_size(w, h, bucket)
        assert rw >= bucket[0] and rh >= bucket[1]
        assert rw == bucket[0] or rh == bucket[1]
        assert abs(rw / rh - w / h) < 0.05
    assert needs_upscale(30, 20, (64, 48)) and not needs_upscale(640, 480, (64, 48))


def test_center_crop_is_centred_and_random_crop_is_fixed_per_image():
    assert crop_offset((100, 48), (64, 48), "center", "abc") == (18, 0)
    offsets = {crop_offset((200, 48), (64, 48), "random", f"image{i}") for i in range(30)}
    assert len(offsets) > 10  # varies across images
    assert all(0 <= x <= 136 and y == 0 for x, y in offsets)
    assert crop_offset((200, 48), (64, 48), "random", "image3") == crop_offset((200, 48), (64, 48), "random",
                                                                               "image3")


def _buckets(counts: dict) -> list:
    return [b for b, n in counts.items() for _ in range(n)]


def test_batches_never_mix_buckets_and_keep_every_tail():
    buckets = _buckets({"a": 5, "b": 1, "c": 8})
    plan = plan_epoch(buckets, 4, seed=0, epoch=0)
    assert sorted(i for batch in plan for i in batch) == list(range(14))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in plan)
    assert len(plan) == 2 + 1 + 2 == batches_per_rank(buckets, 4)


def test_129_samples_in_three_odd_buckets_give_66_batches_not_63():
    buckets = _buckets({"a": 43, "b": 43, "c": 43})  # each bucket's odd tail is a batch of its own
    plan = plan_epoch(buckets, 2, 0, 0)
    assert len(plan) == batches_per_rank(buckets, 2) == 66
    assert sorted(len(b) for b in plan)[:3] == [1, 1, 1]


def test_order_is_deterministic_per_seed_and_epoch():
    buckets = _buckets({"a": 7, "b": 9})
    assert plan_epoch(buckets, 2, 5, 1) == plan_epoch(buckets, 2, 5, 1)
    assert plan_epoch(buckets, 2, 5, 1) != plan_epoch(buckets, 2, 5, 2)
    assert plan_epoch(buckets, 2, 5, 1) != plan_epoch(buckets, 2, 6, 1)
    # (seed 1, epoch 0) must not equal (seed 0, epoch 1), as a seed+epoch generator would make it
    assert plan_epoch(buckets, 2, 1, 0) != plan_epoch(buckets, 2, 0, 1)


def test_buckets_are_interleaved_not_run_one_after_another():
    buckets = _buckets({"a": 40, "b": 40})
    firsts = [buckets[batch[0]] for batch in plan_epoch(buckets, 2, 0, 0)]
    switches = sum(1 for x, y in zip(firsts, firsts[1:]) if x != y)
    assert switches > 5


@pytest.mark.parametrize("counts,bs,world", [({"a": 5, "b": 3}, 2, 2), ({"a": 7}, 3, 3), ({"a": 4, "b": 1}, 4, 4),
                                             ({"a": 9, "b": 2, "c": 1}, 2, 4)])
def test_shards_are_disjoint_cover_everything_and_have_equal_counts(counts, bs, world):
    buckets = _buckets(counts)
    plan = plan_epoch(buckets, bs, 3, 0, world)
    shards = [plan[r::world] for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == batches_per_rank(buckets, bs, world) == math.ceil(
        sum(math.ceil(n / bs) for n in counts.values()) / world)
    seen = Counter(i for batch in plan for i in batch)
    assert sorted(seen) == list(range(len(buckets))) and set(seen.values()) == {1}
    assert all(len({buckets[i] for i in batch}) == 1 for batch in plan)


def test_fewer_samples_than_processes_repeats_batches_rather_than_starving_a_rank():
    plan = plan_epoch(["a"], 1, 0, 0, world_size=3)
    assert plan == [[0], [0], [0]]
