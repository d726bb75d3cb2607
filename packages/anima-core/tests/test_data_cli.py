"""``anima dataset inspect``."""

import numpy as np
import pytest
from PIL import Image

from anima_core.cli import main


def write(path, size=(64, 64), caption="red, circle"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["dataset", "inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_inspect_prints_counts_repeats_buckets_captions_and_problems(tmp_path, capsys, builtin_host):
    data = tmp_path / "data"
    for i in range(3):
        write(data / f"sq{i}.png")
    write(data / "4_wide" / "w.png", size=(96, 64), caption="red, square")
    write(data / "nocap.png", caption=None)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out, _ = run(capsys, data, "-r", "64", "--bucket-step", "16", "-b", "2")
    assert code in (0, None)
    assert "5 usable image(s), 1 skipped" in out
    assert "4_wide: 1 × 4" in out and ".: 4 × 1" in out
    assert "samples per epoch: 8" in out and "batches per epoch at batch size 2: 4" in out
    assert "buckets at 64" in out
    lines = out.splitlines()
    assert any("64x64" in line and " 4 " in line for line in lines)
    assert any("80x48" in line and " 4 " in line for line in lines)
    assert "sources: .txt 4, none 1" in out and "most common tags: red (4)" in out
    assert "problems: 2" in out and "broken.png" in out and "nocap.png" in out


def test_inspect_takes_settings_from_a_config(tmp_path, capsys, builtin_host):
    write(tmp_path / "data" / "a.png")
    write(tmp_path / "reg" / "r.png", caption=None)
    config = tmp_path / "config.yaml"
    config.write_text("dataset:\n  resolution: [32, 64]\n  bucket_step: 16\n  reg: {path: %s, caption: person}\n"
                      "train: {batch_size: 4}\n" % (tmp_path / "reg"))
    code, out, _ = run(capsys, tmp_path / "data", "--config", config)
    assert code in (0, None)
    assert "buckets at 32" in out and "buckets at 64" in out
    assert "regularisation:" in out and "'person'" in out
    assert "batch size 4" in out and "problems: none" in out


@pytest.mark.parametrize("make,message", [(lambda p: None, "folder not found"),
                                          (lambda p: p.write_text("x"), "is a file"),
                                          (lambda p: p.mkdir(), "is empty")])
def test_inspect_bad_folders_exit_2_with_one_message(tmp_path, capsys, builtin_host, make, message):
    target = tmp_path / "data"
    make(target)
    code, out, err = run(capsys, target)
    assert code == 2 and message in err and "Traceback" not in err


def test_inspect_reports_invalid_settings(tmp_path, capsys, builtin_host):
    write(tmp_path / "data" / "a.png")
    code, _, err = run(capsys, tmp_path / "data", "-r", "100")
    assert code == 2 and "dataset.resolution" in err and "multiples of 16" in err
