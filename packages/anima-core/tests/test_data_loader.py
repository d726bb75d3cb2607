"""build_training_data with the tiny VAE: batches, determinism, sharding, the latent cache and its invalidation,
flip, regularisation merge, and the text-encoder cache."""

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anima_core.data import CacheMissError, DatasetSection, build_training_data
from anima_core.data.config import RegSection
from anima_core.data.images import to_tensor
from anima_core.model.vae import load_vae
from anima_core.testing.tiny import write_tiny_model_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def vae(tiny):
    return load_vae(tiny.vae)


def noise_image(path: Path, size=(64, 64), seed=0, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.with_suffix(".txt").write_text(caption if caption is not None else f"tag{seed}, red, blue, green")
    return path


@pytest.fixture
def dataset(tmp_path):
    """3 square images at the root and 2 wide ones in a 2_ folder: 7 samples, two buckets."""
    root = tmp_path / "data"
    for i in range(3):
        noise_image(root / f"sq{i}.png", seed=i)
    for i in range(2):
        noise_image(root / "2_wide" / f"w{i}.png", size=(96, 64), seed=10 + i)
    return root


def section(path, **kw) -> DatasetSection:
    return DatasetSection(path=path, resolution=kw.pop("resolution", [64]), bucket_step=16, **kw)


def build(sec, cache, vae, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("batch_size", 2)
    return build_training_data(sec, cache_dir=cache, vae=vae, progress=False, **kw)


def epoch(data, n=0, start=0):
    return list(data.batches(n, start=start))


def direct_latent(vae, path: Path, bucket, top_left=None, flip=False) -> torch.Tensor:
    """The reference computation: resize to cover (Lanczos), centre-crop, [-1, 1], encode."""
    img = Image.open(path).convert("RGB")
    scale = max(bucket[0] / img.width, bucket[1] / img.height)
    size = (max(bucket[0], round(img.width * scale)), max(bucket[1], round(img.height * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    left, top = top_left or ((size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2)
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    pixels = to_tensor(img)
    if flip:
        pixels = pixels.flip(-1)
    return vae.encode(pixels[None])[0]


def latents_by_key(batches) -> dict:
    out = {}
    for b in batches:
        for key, latent in zip(b.keys, b.latents):
            out.setdefault(key, []).append(latent)
    return out


def test_batches_follow_the_interface(dataset, tmp_path, vae):
    data = build(section(dataset), tmp_path / "cache", vae)
    batches = epoch(data)
    assert len(batches) == len(data) == 2 + 2  # 3 squares → 2 (the tail kept), 4 wide samples → 2
    assert data.num_images == 5 and data.problems == []
    keys = Counter(k for b in batches for k in b.keys)
    assert keys == {"sq0.png": 1, "sq1.png": 1, "sq2.png": 1, "2_wide/w0.png": 2, "2_wide/w1.png": 2}
    for b in batches:
        assert b.latents.dtype == torch.float32 and b.latents.shape[1:3] == (16, 1)
        assert b.latents.shape[3:] in {(8, 8), (6, 10)}  # one bucket per batch: 64x64 or 80x48
        assert len(b.captions) == len(b.keys) == b.latents.shape[0] == b.loss_weight.shape[0] == b.is_reg.shape[0]
        assert b.is_reg.dtype == torch.bool and not b.is_reg.any() and torch.equal(b.loss_weight,
                                                                                   torch.ones(len(b.keys)))


def test_cached_latent_is_the_encoding_of_the_resized_centre_crop(dataset, tmp_path, vae):
    data = build(section(dataset), tmp_path / "cache", vae)
    got = latents_by_key(epoch(data))
    torch.testing.assert_close(got["2_wide/w0.png"][0], direct_latent(vae, dataset / "2_wide/w0.png", (80, 48)))
    torch.testing.assert_close(got["sq1.png"][0], direct_latent(vae, dataset / "sq1.png", (64, 64)))


def test_order_and_captions_are_deterministic_per_seed_and_epoch(dataset, tmp_path, vae):
    sec = section(dataset, shuffle_caption=True)
    a = build(sec, tmp_path / "cache", vae, seed=3)
    b = build(sec, tmp_path / "cache", vae, seed=3)

    def view(batches):
        return [(x.keys, x.captions) for x in batches]

    assert view(epoch(a, 1)) == view(epoch(b, 1))
    assert view(epoch(a, 1)) != view(epoch(a, 2))
    assert view(epoch(a, 1)) != view(epoch(build(sec, tmp_path / "cache", vae, seed=4), 1))


def test_start_skips_batches_exactly_like_a_resumed_epoch(dataset, tmp_path, vae):
    data = build(section(dataset, shuffle_caption=True, flip_aug=True), tmp_path / "cache", vae)
    full = epoch(data, 2)
    tail = epoch(data, 2, start=3)
    assert len(tail) == len(full) - 3
    for x, y in zip(full[3:], tail):
        assert x.keys == y.keys and x.captions == y.captions and torch.equal(x.latents, y.latents)
    assert epoch(data, 2, start=len(full)) == []


def test_ranks_see_disjoint_batches_and_the_same_count(dataset, tmp_path, vae):
    sec = section(dataset)
    ranks = [build(sec, tmp_path / "cache", vae, rank=r, world_size=3, batch_size=2) for r in range(3)]
    shards = [epoch(d, 1) for d in ranks]
    assert [len(s) for s in shards] == [len(d) for d in ranks] == [2, 2, 2]  # 4 batches, two split → 6
    keys = Counter(k for shard in shards for b in shard for k in b.keys)
    assert keys == {"sq0.png": 1, "sq1.png": 1, "sq2.png": 1, "2_wide/w0.png": 2, "2_wide/w1.png": 2}
    single = build(sec, tmp_path / "cache", vae)
    assert Counter(k for b in epoch(single, 1) for k in b.keys) == keys


def test_each_image_is_encoded_once_however_often_it_repeats(tmp_path, vae, monkeypatch):
    noise_image(tmp_path / "data" / "5_a" / "x.png", seed=1)
    noise_image(tmp_path / "data" / "copy.png", seed=1)  # identical bytes: same cache entry
    noise_image(tmp_path / "data" / "y.png", seed=2)
    calls = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda images: calls.append(images.shape[0]) or original(images))
    data = build(section(tmp_path / "data", repeats=3, flip_aug=True), tmp_path / "cache", vae, batch_size=4)
    assert sum(calls) == data.encoded == 2 * 2  # two distinct images, plain + mirrored
    assert sum(len(b.keys) for b in epoch(data)) == (5 + 1 + 1) * 3


def test_cache_is_reused_and_a_changed_image_is_re_encoded(dataset, tmp_path, vae):
    sec = section(dataset)
    first = build(sec, tmp_path / "cache", vae)
    assert (first.encoded, first.reused) == (5, 0)
    again = build(sec, tmp_path / "cache", vae)
    assert (again.encoded, again.reused) == (0, 5)
    noise_image(dataset / "sq1.png", seed=99)  # new content, same name
    changed = build(sec, tmp_path / "cache", vae)
    assert (changed.encoded, changed.reused) == (1, 4)
    latent = latents_by_key(epoch(changed))["sq1.png"][0]
    torch.testing.assert_close(latent, direct_latent(vae, dataset / "sq1.png", (64, 64)))  # never the stale one


def test_a_changed_resolution_or_vae_is_re_encoded(dataset, tmp_path, vae):
    build(section(dataset), tmp_path / "cache", vae)
    assert build(section(dataset, resolution=[48]), tmp_path / "cache", vae).encoded == 5
    other = load_vae_copy(vae)
    rebuilt = build(section(dataset), tmp_path / "cache", other)
    assert rebuilt.encoded == 5
    a = latents_by_key(epoch(build(section(dataset), tmp_path / "cache", vae)))
    b = latents_by_key(epoch(rebuilt))
    assert not torch.allclose(a["sq0.png"][0], b["sq0.png"][0])


def load_vae_copy(vae):
    import copy

    other = copy.deepcopy(vae)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    return other


def test_vae_none_reads_a_complete_cache_and_refuses_an_incomplete_one(dataset, tmp_path, vae):
    with pytest.raises(CacheMissError, match="cache .* is empty; load the VAE to encode the 5 latent"):
        build(section(dataset), tmp_path / "cache", None)
    with_vae = build(section(dataset), tmp_path / "cache", vae)
    without = build(section(dataset), tmp_path / "cache", None)
    assert without.encoded == 0
    for x, y in zip(epoch(with_vae, 1), epoch(without, 1)):
        assert x.keys == y.keys and torch.equal(x.latents, y.latents)
    with pytest.raises(CacheMissError, match="5 latent.*load the VAE"):  # the mirrored latents are missing
        build(section(dataset, flip_aug=True), tmp_path / "cache", None)


def test_flip_caches_both_latents_and_epochs_pick_either(dataset, tmp_path, vae):
    data = build(section(dataset, flip_aug=True), tmp_path / "cache", vae, batch_size=1)
    assert data.encoded == 10
    plain = direct_latent(vae, dataset / "sq0.png", (64, 64))
    mirrored = direct_latent(vae, dataset / "sq0.png", (64, 64), flip=True)
    assert not torch.allclose(mirrored, plain.flip(-1))  # encoded from mirrored pixels, not a flipped latent
    seen = [latents_by_key(epoch(data, e))["sq0.png"][0] for e in range(8)]
    flags = []
    for latent in seen:
        is_plain = torch.allclose(latent, plain, atol=1e-5)
        assert is_plain or torch.allclose(latent, mirrored, atol=1e-5)
        flags.append(is_plain)
    assert True in flags and False in flags
    assert [data.flipped(e, 0) for e in range(8)] == [data.flipped(e, 0) for e in range(8)]


def test_random_crop_is_fixed_per_image_and_differs_from_the_centre(tmp_path, vae):
    noise_image(tmp_path / "data" / "wide.png", size=(160, 48), seed=5)
    sec = section(tmp_path / "data", crop="random")
    a = latents_by_key(epoch(build(sec, tmp_path / "c1", vae)))["wide.png"][0]
    b = latents_by_key(epoch(build(sec, tmp_path / "c2", vae), 3))["wide.png"][0]
    centre = latents_by_key(epoch(build(section(tmp_path / "data"), tmp_path / "c1", vae)))["wide.png"][0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, centre)


def test_regularisation_images_are_merged_with_their_weight_flag_and_caption(dataset, tmp_path, vae):
    noise_image(tmp_path / "reg" / "r0.png", seed=50, caption="ignored")
    noise_image(tmp_path / "reg" / "r1.png", seed=51, caption="ignored")
    sec = section(dataset, trigger="sks", reg=RegSection(path=tmp_path / "reg", caption="1girl, solo",
                                                         loss_weight=0.25, repeats=2))
    data = build(sec, tmp_path / "cache", vae, batch_size=3)
    assert (data.num_images, data.num_reg_images) == (5, 2)
    rows = [(k, c, float(w), bool(r)) for b in epoch(data) for k, c, w, r in
            zip(b.keys, b.captions, b.loss_weight, b.is_reg)]
    reg_rows = [row for row in rows if row[0].startswith("reg:")]
    assert len(reg_rows) == 4 and len(rows) == 7 + 4
    assert all(c == "1girl, solo" and w == 0.25 and r for _, c, w, r in reg_rows)
    assert all(c.startswith("sks, ") and w == 1.0 and not r for k, c, w, r in rows if not k.startswith("reg:"))


def test_multi_resolution_trains_each_image_at_each_resolution(dataset, tmp_path, vae):
    data = build(section(dataset, resolution=[64, 32]), tmp_path / "cache", vae)
    shapes = Counter((k, tuple(lat.shape[-2:])) for b in epoch(data) for k, lat in zip(b.keys, b.latents))
    assert shapes[("sq0.png", (8, 8))] == 1 and shapes[("sq0.png", (4, 4))] == 1
    assert sum(shapes.values()) == 14


def test_cache_files_leave_no_temp_files_and_a_damaged_entry_is_re_encoded(dataset, tmp_path, vae):
    build(section(dataset), tmp_path / "cache", vae)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 5 and not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    files[0].write_bytes(files[0].read_bytes()[:40])
    assert build(section(dataset), tmp_path / "cache", vae).encoded == 1


def test_latents_come_from_memory_or_a_reader_thread_with_the_same_result(dataset, tmp_path, vae, monkeypatch):
    from anima_core.data import loader

    sec = section(dataset, flip_aug=True, shuffle_caption=True)
    in_memory = build(sec, tmp_path / "cache", vae, batch_size=1)
    monkeypatch.setattr(loader, "RAM_BUDGET_BYTES", 0)
    from_disk = build(sec, tmp_path / "cache", vae, batch_size=1)
    for x, y in zip(epoch(in_memory, 4), epoch(from_disk, 4), strict=True):
        assert x.keys == y.keys and x.captions == y.captions and torch.equal(x.latents, y.latents)
    assert not any(t.name == "anima-data-prefetch" for t in threading.enumerate())
    it = from_disk.batches(0)
    next(it)
    assert any(t.name == "anima-data-prefetch" for t in threading.enumerate())
    it.close()  # the runtime may stop mid-epoch: the reader thread must end
    for t in threading.enumerate():
        if t.name == "anima-data-prefetch":
            t.join(timeout=5)
            assert not t.is_alive()


def test_a_latent_removed_mid_run_is_a_clear_error(dataset, tmp_path, vae, monkeypatch):
    from anima_core.data import loader

    monkeypatch.setattr(loader, "RAM_BUDGET_BYTES", 0)
    data = build(section(dataset), tmp_path / "cache", vae, batch_size=1)
    for p in (tmp_path / "cache").rglob("*.safetensors"):
        p.unlink()
    with pytest.raises(RuntimeError, match="cannot be read.*run again"):
        epoch(data)


def test_text_encoder_cache_matches_encoding_online(dataset, tmp_path, vae, tiny):
    from anima_core.model.text_encoder import TextEncoder, load_qwen3, load_tokenizer

    encoder = TextEncoder(load_qwen3(tiny.text_encoder), load_tokenizer(tiny.qwen_tokenizer, "qwen_tokenizer"),
                          load_tokenizer(tiny.t5_tokenizer, "t5_tokenizer"))
    (dataset / "sq2.txt").write_text("a much longer caption, with (weighted:1.3) tags, and more, and more")
    data = build(section(dataset, cache_text_encoder=True, trigger="sks"), tmp_path / "cache", vae, batch_size=3)
    data.attach_text_cache(encoder, progress=False)
    checked = 0
    for b in epoch(data):
        online = encoder.tokenize(b.captions)
        hidden = encoder.encode_qwen(online)
        for name in ("qwen_ids", "qwen_mask", "t5_ids", "t5_mask", "t5_weights"):
            assert torch.equal(getattr(b.text.text, name), getattr(online, name)), name
        torch.testing.assert_close(b.text.qwen_hidden, hidden, atol=1e-5, rtol=1e-4)
        checked += len(b.captions)
    assert checked == 7
    shuffled = build(section(dataset, shuffle_caption=True), tmp_path / "cache", vae)
    with pytest.raises(ValueError, match="deterministic captions"):
        shuffled.attach_text_cache(encoder, progress=False)
