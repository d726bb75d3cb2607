"""Safety of what training writes and reads (issue #21): a cache reused across processes, no NaN/inf ever saved
and diverged runs stopped, output names kept inside output.dir, failing runs leaving the earlier run's records
alone, Ctrl-C honoured during caching, long captions cut with a warning, and file modes from the user's umask."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from anima_core.config.loading import ConfigError, validate_config
from anima_core.errors import UserError
from anima_core.testing import installed_registry
from anima_core.testing.datasets import write_shapes_dataset
from anima_core.testing.tiny import write_tiny_model_set
from anima_core.testing.training import tiny_train_config
from anima_core.training.api import train
from anima_core.training.finite import NonFiniteError
from anima_core.training.phases.loop import MAX_SKIPPED_STEPS, TrainingDiverged

config = tiny_train_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cli(config_path: Path, *args: str, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ANIMA_DISABLE_PLUGINS", "ANIMA_STRICT_PLUGINS")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "anima_core", "train", str(config_path), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: (mtime_ns, bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. the latent and text caches are reused by a new process ---------------------------------------------------

@pytest.mark.slow
def test_a_second_process_with_another_hash_seed_encodes_nothing(tiny, images, tmp_path):
    cache = tmp_path / "cache"
    results = []
    for run, seed in (("a", "1"), ("b", "2")):  # these two seeds ordered the old identity's set differently
        cfg = config(tiny, images, tmp_path / run, train={"max_steps": 1},
                     dataset={"cache_text_encoder": True}, output={"cache_dir": str(cache)})
        results.append(train_cli(write_config(tmp_path / f"{run}.yaml", cfg), env_extra={"PYTHONHASHSEED": seed}))
        assert results[-1].returncode == 0, results[-1].stderr[-3000:]
        if run == "a":
            first = snapshot(cache)
    assert "latents: 4 encoded, 0 reused" in results[0].stderr
    assert "latents: 0 encoded, 4 reused" in results[1].stderr
    assert [p.name for p in (cache / "latents").iterdir() if p.is_dir()] != []
    assert len([p for p in (cache / "latents").iterdir() if p.is_dir()]) == 1
    assert len([p for p in (cache / "text").iterdir() if p.is_dir()]) == 1
    after = snapshot(cache)
    entries = {k for k in first if k.endswith(".safetensors")}
    assert entries and {k for k in after if k.endswith(".safetensors")} == entries
    assert all(after[k] == first[k] for k in entries)  # not rewritten either (same mtime, same bytes)


# -- 2. nothing non-finite is saved; diverged runs stop ----------------------------------------------------------

@pytest.mark.slow
def test_infinite_lr_stops_with_exit_1_naming_the_lr_and_saves_nothing(tiny, images, tmp_path):
    out = tmp_path / "out"
    path = write_config(tmp_path / "c.yaml", config(tiny, images, out, train={"max_steps": 50},
                                                    output={"save_every_n_steps": 1}))
    result = train_cli(path, "--set", "optimizer.lr=.inf")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "TrainingDiverged" in result.stderr and "optimizer.lr (inf) is too high" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.rglob("*.safetensors")) or all("cache" in p.parts for p in out.rglob("*.safetensors"))
    assert not (out / "state").exists()


def _poison_latents(cache: Path) -> int:
    files = list((cache / "latents").rglob("*.safetensors"))
    for f in files:
        latent = load_file(str(f))["latent"]
        save_file({"latent": torch.full_like(latent, float("nan"))}, str(f))
    return len(files)


@pytest.mark.slow
def test_nan_data_stops_the_run_naming_the_images(tiny, images, tmp_path):
    out = tmp_path / "out"
    train(config(tiny, images, out, train={"max_steps": 1}))
    assert _poison_latents(out / "cache") == 4
    lora_before = (out / "anima_lora.safetensors").read_bytes()
    # a run shorter than the limit that never steps: today "done: 0 steps", exit 0
    with pytest.raises(TrainingDiverged, match=r"all 4 optimizer steps were skipped.*training data is NaN/inf.*"
                                               r"img_00\d\.png"):
        train(config(tiny, images, out, train={"max_steps": 4}))
    # a long run stops after MAX_SKIPPED_STEPS instead of skipping for ever
    with pytest.raises(TrainingDiverged, match=rf"{MAX_SKIPPED_STEPS} optimizer steps in a row were skipped "
                                               rf"\(steps 1–{MAX_SKIPPED_STEPS}, {MAX_SKIPPED_STEPS} micro-batch"):
        train(config(tiny, images, out, train={"max_steps": 1000, "batch_size": 1}))
    assert (out / "anima_lora.safetensors").read_bytes() == lora_before
    monitor = json.loads((out / "monitor_state.json").read_text())
    assert monitor["skipped_steps"] == MAX_SKIPPED_STEPS and monitor["skipped_nonfinite"] == MAX_SKIPPED_STEPS


@pytest.mark.slow
def test_resuming_from_a_nan_state_is_refused(tiny, images, tmp_path):
    out = tmp_path / "out"
    first = train(config(tiny, images, out, train={"max_steps": 2}))
    adapter = first.state / "adapter.safetensors"
    tensors = load_file(str(adapter))
    key = next(k for k in tensors if "lora_up" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter))
    with pytest.raises(UserError, match=rf"--resume: the state in .*step_00000002 is not usable: 1 adapter weights "
                                        rf"are NaN/inf \({key}\)"):
        train(config(tiny, images, out, train={"max_steps": 4}), resume="auto")


def test_a_state_with_a_nan_tensor_is_never_written(tmp_path):
    from anima_core.training.state import complete_states, save_state

    def adapter(value):
        return lambda path: save_file({"w": torch.full((2, 2), value)}, str(path))

    good = save_state(tmp_path, step=1, write_adapter=adapter(1.0), optim={"optimizer": {}}, info={}, keep=0)
    with pytest.raises(NonFiniteError, match="refusing to write .*step_00000002.*1 tensor"):
        save_state(tmp_path, step=2, write_adapter=adapter(float("nan")), optim={}, info={}, keep=0)
    with pytest.raises(NonFiniteError, match=r"optimizer-side tensor.*optimizer\.state\.0\.exp_avg"):
        save_state(tmp_path, step=3, write_adapter=adapter(1.0), info={}, keep=0,
                   optim={"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}})
    assert complete_states(tmp_path) == [good]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no temp folder left behind


@pytest.mark.slow
def test_a_lora_with_nan_weights_is_never_written(tiny, images, tmp_path, monkeypatch):
    from anima_core.training.phases import loop

    monkeypatch.setattr(loop, "_check_weights", lambda ctx: None)  # the loop's own guard off: the save's check
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"refusing to write .*anima_lora\.safetensors: 40 tensor\(s\)"):
        train(config(tiny, images, out, train={"max_steps": 1}, optimizer={"lr": float("inf")}))
    assert [p.name for p in out.glob("*.safetensors")] == []
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp file left


class NaNOnSecondCall:
    def __init__(self):
        self.calls = 0

    def compute(self, pred, target, t):
        self.calls += 1
        out = (pred - target).pow(2)
        return out * float("nan") if self.calls == 2 else out


@pytest.mark.slow
def test_skipped_micro_batches_are_reported_in_the_monitor_and_the_summary(tiny, images, tmp_path, capsys):
    from typing import Literal

    from anima_core import hookimpl
    from anima_core.options import LossOptions
    from anima_core.plugin_host import make_host
    from anima_core.specs import VariantSpec
    from anima_core.testing.distributions import entry_points_of

    class NaNOptions(LossOptions):
        type: Literal["nan_once"] = "nan_once"

    class Plugin:
        @hookimpl
        def anima_register_losses(self, register):
            register(VariantSpec(name="nan_once", options=NaNOptions, build=lambda o: NaNOnSecondCall(),
                                 description="test"))

    host = make_host(entry_points=entry_points_of("anima-core"), strict=True, plugins=[("nan", Plugin())])
    out = tmp_path / "out"
    result = train(config(tiny, images, out, loss={"type": "nan_once"}, train={"max_steps": 3, "batch_size": 1}),
                   registry=host.registry)
    assert result.steps == 3 and result.skipped_nonfinite == 1
    monitor = json.loads((out / "monitor_state.json").read_text())
    assert (monitor["skipped_nonfinite"], monitor["skipped_steps"]) == (1, 1)
    assert ("skipped (non-finite): 1 micro-batch(es) with a non-finite loss, 1 optimizer step(s)"
            in capsys.readouterr().err)


# -- 3. output.name stays inside output.dir ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".", "a\\b", "x:y", ".hidden", " padded"])
def test_output_names_that_are_not_plain_file_names_are_refused(name):
    with pytest.raises(ConfigError) as err:
        validate_config({"output": {"name": name}}, installed_registry())
    text = err.value.render()
    assert "output.name" in text and "plain file name" in text and repr(name) in text


def test_a_plain_output_name_is_kept():
    assert validate_config({"output": {"name": "my lora-v2.1"}}, installed_registry()).config.output.name \
        == "my lora-v2.1"


@pytest.mark.slow
def test_anima_train_refuses_an_escaping_name_with_exit_2(tiny, images, tmp_path):
    out = tmp_path / "out"
    path = write_config(tmp_path / "c.yaml", config(tiny, images, out, output={"name": "../escaped"}))
    result = train_cli(path)
    assert result.returncode == 2 and "output.name" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob("escaped*"))


# -- 4. pickles are never read ------------------------------------------------------------------------------------

def test_a_text_encoder_folder_with_only_pickle_weights_is_refused_unread(tiny, images, tmp_path):
    from transformers import Qwen3Config

    folder = tmp_path / "qwen3_hf"
    Qwen3Config(**tiny.qwen_config).save_pretrained(folder)
    # A pickle that would leave a trace if it were ever unpickled.
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Payload()}, folder / "pytorch_model.bin")
    path = write_config(tmp_path / "c.yaml", config(tiny, images, tmp_path / "out", model={"text_encoder": str(folder)}))
    result = train_cli(path)
    assert result.returncode == 2, result.stderr
    assert "model.text_encoder" in result.stderr and "convert them to safetensors" in result.stderr
    assert "pytorch_model.bin" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


# -- 5. failing runs leave the earlier run's records alone; a resumed run appends -------------------------------

@pytest.mark.slow
def test_failing_runs_leave_the_earlier_runs_records_and_a_resume_appends(tiny, images, tmp_path):
    out = tmp_path / "out"
    good = config(tiny, images, out, train={"max_steps": 2}, output={"save_state_every_n_steps": 1})
    train(good)
    records = ("config.yaml", "monitor_state.json", "loss_curve.png", "anima_lora.safetensors")
    before = {name: (out / name).read_bytes() for name in records}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    not_a_state = tmp_path / "nostate"
    not_a_state.mkdir()
    damaged = out / "state" / "step_00000002"
    (damaged / "optim.pt").write_bytes(b"garbage")
    # each differs from the good run's config (lr), so a rewritten config.yaml would show
    failing = [
        (dict(model={"transformer": str(broken)}), None),  # models phase
        (dict(adapter={"targets": ["no_such_module"]}), None),  # adapter injection
        (dict(dataset={"resolution": [64], "path": str(tmp_path / "empty")}), None),  # bootstrap checks
        ({}, str(not_a_state)),  # bootstrap: --resume is not a state
        ({}, str(damaged)),  # resume phase: unreadable state
    ]
    (tmp_path / "empty").mkdir()
    for sections, resume in failing:
        sections.setdefault("optimizer", {"lr": 1e-4})
        with pytest.raises(Exception) as err:
            train(config(tiny, images, out, train={"max_steps": 4}, **sections), resume=resume)
        assert not isinstance(err.value, AssertionError)
        for name in records:
            assert (out / name).read_bytes() == before[name], (sections, resume, name, err.value)
    resumed = train(config(tiny, images, out, train={"max_steps": 4}),
                    resume=out / "state" / "step_00000001")
    assert resumed.steps == 4
    monitor = json.loads((out / "monitor_state.json").read_text())
    assert [e["step"] for e in monitor["losses"]] == [1, 2, 3, 4]  # step 1 kept, 2–4 from the resumed run
    assert monitor["losses"][0] == json.loads(before["monitor_state.json"])["losses"][0]
    assert [r["step"] for r in monitor["resumed"]] == [1]


# -- 7. Ctrl-C during caching ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_during_caching_stops_at_once_and_keeps_the_cache(tiny, tmp_path):
    from anima_core.data import DatasetSection, build_training_data
    from anima_core.model.vae import load_vae

    n = 60
    data = write_shapes_dataset(tmp_path / "many", n=n, size=(128, 128))
    out = tmp_path / "out"
    path = write_config(tmp_path / "c.yaml", config(tiny, data, out, dataset={"resolution": [128],
                                                                              "vae_batch_size": 1}))
    env = {k: v for k, v in os.environ.items() if k != "ANIMA_DISABLE_PLUGINS"}
    proc = subprocess.Popen([sys.executable, "-m", "anima_core", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    latents = out / "cache" / "latents"
    deadline = time.time() + 240
    while not list(latents.rglob("*.safetensors")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    kept = len(list(latents.rglob("*.safetensors")))
    assert 1 <= kept < n // 2, kept  # stopped between cache items, not after all of them
    assert f"stopped while caching latents: {kept} of {n} encoded and kept" in err
    assert sorted(p.name for p in out.iterdir()) == ["cache"]  # no step, no state, no LoRA, no records
    rebuilt = build_training_data(DatasetSection(path=data, resolution=[128]), seed=0, batch_size=2,
                                  cache_dir=out / "cache", vae=load_vae(tiny.vae), progress=False)
    assert (rebuilt.reused, rebuilt.encoded) == (kept, n - kept)


# -- 8. long captions ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_huge_caption_is_cut_with_one_warning_naming_its_file(tiny, tmp_path, capsys):
    from anima_core.model.text_encoder import MAX_QWEN_TOKENS, MAX_T5_TOKENS, TextEncoder, load_qwen3, load_tokenizer

    data = write_shapes_dataset(tmp_path / "data", n=3)
    huge = data / "img_001.txt"
    huge.write_text(", ".join(f"tag{i}" for i in range(10_000)))
    text = TextEncoder(load_qwen3(tiny.text_encoder), load_tokenizer(tiny.qwen_tokenizer, "qwen_tokenizer"),
                       load_tokenizer(tiny.t5_tokenizer, "t5_tokenizer"))
    caption = huge.read_text()
    full, cut = text.tokenize([caption]), text.tokenize([caption, "red circle"], truncate=True)
    assert full.t5_ids.shape[1] > 10_000 and full.qwen_ids.shape[1] > 10_000
    assert cut.t5_ids.shape[1] == MAX_T5_TOKENS and cut.qwen_ids.shape[1] == MAX_QWEN_TOKENS
    assert cut.t5_ids[0, :-1].tolist() == full.t5_ids[0, :MAX_T5_TOKENS - 1].tolist()  # the start is kept
    assert int(cut.t5_ids[0, -1]) == text.t5_eos_id and int(cut.t5_mask[1].sum()) < 20

    result = train(config(tiny, data, tmp_path / "out", train={"max_steps": 1}))
    assert result.steps == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "longer than training reads" in line]
    assert len(warnings) == 1 and str(huge) in warnings[0] and "1 caption(s)" in warnings[0]
    assert "img_000" not in warnings[0] and "img_002" not in warnings[0]


# -- 9. file modes -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_file_a_run_writes_gets_the_mode_the_umask_gives(tiny, images, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        train(config(tiny, images, out, train={"max_steps": 2},
                     sample={"prompts": ["red circle"], "every_n_steps": 2, "baseline": True},
                     output={"save_every_n_steps": 1, "save_state_every_n_steps": 1, "export_diffusers": True}))
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".safetensors", ".pt", ".json", ".yaml", ".png", ".txt"} <= kinds, kinds
    assert any(p.name.endswith(".diffusers.safetensors") for p in files) and (out / "samples").is_dir()
    modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o640"}, modes
    folders = {oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_dir()}
    assert folders == {"0o750"}, folders
