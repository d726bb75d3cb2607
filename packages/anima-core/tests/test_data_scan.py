"""Scanning dataset folders: repeats, caption lookup, buckets, and every kind of bad input (generated broken files)."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from anima_core.data import DatasetSection, scan_dataset
from anima_core.data.config import RegSection
from anima_core.errors import UserError


def image(path: Path, size=(64, 64), colour=(200, 30, 30), fmt=None, caption: str | None = "a, b") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def section(path, **kw) -> DatasetSection:
    return DatasetSection(path=path, resolution=kw.pop("resolution", [64]), bucket_step=16, **kw)


def by_key(report):
    return {r.key: r for r in report.records}


def test_missing_folder_file_and_unset_path_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="dataset.path: folder not found: .*nope"):
        scan_dataset(section(tmp_path / "nope"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file; expected a folder"):
        scan_dataset(section(tmp_path / "file.png"))
    with pytest.raises(UserError, match="dataset.path is not set"):
        scan_dataset(DatasetSection())


def test_empty_folder_and_folder_without_images(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="is empty"):
        scan_dataset(section(tmp_path / "empty"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a")
    (tmp_path / "texts" / "b.gif").write_bytes(b"GIF89a")
    with pytest.raises(UserError, match=r"no images \(png/jpg/jpeg/webp/bmp\) .* \(2 other file"):
        scan_dataset(section(tmp_path / "texts"))


def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_corrupt_images_are_skipped_and_listed_once_and_the_rest_kept(tmp_path):
    image(tmp_path / "good.png")
    _truncated_png(tmp_path / "truncated.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "zero.webp").write_bytes(b"")
    report = scan_dataset(section(tmp_path))
    assert [r.key for r in report.images] == ["good.png"]
    assert sorted(p.name for p, _ in report.unreadable) == ["garbage.jpg", "truncated.png", "zero.webp"]
    lines = [p for p in report.problems if "unreadable" in p]
    assert len(lines) == 1
    assert "truncated.png" in lines[0] and "garbage.jpg" in lines[0] and "zero.webp" in lines[0]
    assert "truncated" in lines[0]  # the reason is given


def test_no_usable_image_is_an_error_listing_the_broken_files(tmp_path):
    _truncated_png(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"no usable images .* all 2 are unreadable") as err:
        scan_dataset(section(tmp_path))
    assert "a.png" in str(err.value) and "b.jpg" in str(err.value)


def test_missing_captions_train_empty_with_one_warning_listing_them(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png", caption=None)
    image(tmp_path / "c.png", caption=None)
    report = scan_dataset(section(tmp_path))
    records = by_key(report)
    assert records["b.png"].caption.empty and records["b.png"].caption_source == ""
    lines = [p for p in report.problems if "no usable caption file" in p]
    assert len(lines) == 1 and "b.png" in lines[0] and "c.png" in lines[0] and "a.png" not in lines[0]


def test_caption_priority_is_json_then_txt_then_caption(tmp_path):
    image(tmp_path / "a.png", caption="from txt")
    (tmp_path / "a.json").write_text(json.dumps({"tags": ["from json"]}))
    (tmp_path / "a.caption").write_text("from caption")
    image(tmp_path / "b.png", caption=None)
    (tmp_path / "b.caption").write_text("from caption")
    image(tmp_path / "c.png", caption="from txt")
    (tmp_path / "c.caption").write_text("from caption")
    records = by_key(scan_dataset(section(tmp_path)))
    assert records["a.png"].caption.all_tags() == ["from json"] and records["a.png"].caption_source == ".json"
    assert records["b.png"].caption.all_tags() == ["from caption"]
    assert records["c.png"].caption.all_tags() == ["from txt"]
    records = by_key(scan_dataset(section(tmp_path, caption_extensions=[".caption", ".txt"])))
    assert records["a.png"].caption.all_tags() == ["from caption"]


def test_malformed_json_warns_with_file_and_parse_error_and_falls_back_to_txt(tmp_path):
    image(tmp_path / "a.png", caption="fallback tag")
    (tmp_path / "a.json").write_text('{"tags": ["x",]}')
    image(tmp_path / "b.png", caption=None)
    (tmp_path / "b.json").write_text('{"unknown": 1}')
    report = scan_dataset(section(tmp_path))
    records = by_key(report)
    assert records["a.png"].caption.all_tags() == ["fallback tag"] and records["a.png"].caption_source == ".txt"
    assert records["b.png"].caption.empty
    lines = [p for p in report.problems if "could not be used" in p]
    assert len(lines) == 1
    assert "a.json: not valid JSON: Expecting value: line 1 column 15" in lines[0]
    assert "b.json: no caption fields" in lines[0]


def test_non_utf8_captions_are_decoded_with_replacement_and_warned(tmp_path):
    image(tmp_path / "a.png", caption=None)
    (tmp_path / "a.txt").write_bytes("naïve, smile".encode("cp1252"))
    report = scan_dataset(section(tmp_path))
    assert by_key(report)["a.png"].caption.tags == ("na\ufffdve", "smile")
    assert any("not valid UTF-8" in p and "a.txt" in p for p in report.problems)


def test_empty_caption_files_are_warned(tmp_path):
    image(tmp_path / "a.png", caption="  ,  \n")
    report = scan_dataset(section(tmp_path))
    assert any("empty" in p and "a.txt" in p for p in report.problems)


def test_folder_repeats_nest_multiply_by_section_repeats_and_zero_skips(tmp_path):
    image(tmp_path / "root.png")
    image(tmp_path / "3_char" / "a.png")
    image(tmp_path / "3_char" / "extra" / "b.png")  # inherits 3 from its N_name ancestor
    image(tmp_path / "3_char" / "2_close" / "c.png")  # the nearest N_name wins
    image(tmp_path / "0_off" / "d.png")
    image(tmp_path / "style_1" / "e.png")  # not N_name: repeat 1
    report = scan_dataset(section(tmp_path, repeats=2))
    repeats = {r.key: r.repeats for r in report.images}
    assert repeats == {"root.png": 2, "3_char/a.png": 6, "3_char/extra/b.png": 6, "3_char/2_close/c.png": 4,
                       "style_1/e.png": 2}
    assert any("repeat 0" in p and "0_off" in p for p in report.problems)
    assert report.samples_per_epoch() == 2 + 6 + 6 + 4 + 2
    assert report.repeats_by_folder()["3_char"] == (1, 6)


def test_all_formats_recursive_uppercase_and_hidden_files(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "sub" / "b.JPG", fmt="JPEG")
    image(tmp_path / "sub" / "deeper" / "c.webp", fmt="WEBP")
    image(tmp_path / "d.bmp", fmt="BMP")
    image(tmp_path / "e.jpeg", fmt="JPEG")
    image(tmp_path / ".hidden" / "f.png")
    image(tmp_path / ".g.png")
    report = scan_dataset(section(tmp_path))
    assert [r.key for r in report.images] == ["a.png", "d.bmp", "e.jpeg", "sub/b.JPG", "sub/deeper/c.webp"]
    assert report.problems == []


def test_exif_orientation_decides_the_bucket(tmp_path):
    img = Image.new("RGB", (96, 48), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90°: displayed as 48x96
    img.save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "rotated.txt").write_text("x")
    record = scan_dataset(section(tmp_path)).images[0]
    assert (record.width, record.height) == (48, 96)
    assert record.buckets[0][0] < record.buckets[0][1]


def test_buckets_per_resolution_and_upscale_warning(tmp_path):
    image(tmp_path / "wide.png", size=(128, 64))
    image(tmp_path / "tiny.png", size=(20, 20))
    report = scan_dataset(section(tmp_path, resolution=[64, 128]))
    records = by_key(report)
    assert records["wide.png"].buckets == ((80, 48), (160, 96))
    assert records["tiny.png"].buckets == ((64, 64), (128, 128))
    lines = [p for p in report.problems if "upscaled" in p]
    assert len(lines) == 1 and "tiny.png (20x20 → 64x64)" in lines[0] and "tiny.png (20x20 → 128x128)" in lines[0]
    assert "wide.png (128x64 → 160x96)" in lines[0] and "wide.png (128x64 → 80x48)" not in lines[0]
    assert report.bucket_histogram()[128] == {(160, 96): 1, (128, 128): 1}


def test_regularisation_set_with_caption_override_repeats_and_prefixed_keys(tmp_path):
    image(tmp_path / "train" / "a.png", caption="sks, smile")
    image(tmp_path / "reg" / "2_class" / "r.png", caption=None)
    report = scan_dataset(section(tmp_path / "train", reg=RegSection(path=tmp_path / "reg", caption="1girl, solo",
                                                                     loss_weight=0.5, repeats=3)))
    assert [r.key for r in report.images] == ["a.png"]
    (reg,) = report.reg_images
    assert reg.key == "reg:2_class/r.png" and reg.is_reg and reg.repeats == 6
    assert reg.caption.tags == ("1girl", "solo") and reg.caption_source == "override"
    assert report.problems == []  # an override means no usable caption file is needed
    with pytest.raises(UserError, match="dataset.reg.path: folder not found"):
        scan_dataset(section(tmp_path / "train", reg=RegSection(path=tmp_path / "nope")))


def test_identical_files_share_a_content_hash_and_a_changed_file_does_not(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    image(tmp_path / "c.png", colour=(0, 0, 255))
    records = by_key(scan_dataset(section(tmp_path)))
    assert records["a.png"].content_hash == records["b.png"].content_hash != records["c.png"].content_hash
