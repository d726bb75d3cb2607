"""``anima train`` end to end on the tiny model set (CPU, fp32, 64 px)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from anima_core.testing.datasets import write_shapes_dataset
from anima_core.testing.tiny import write_tiny_model_set
from anima_core.testing.training import fixed_eval_loss, tiny_train_config
from anima_core.training.api import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4)


config = tiny_train_config


def adapter_tensors(state_dir: Path) -> dict:
    return load_file(str(state_dir / "adapter.safetensors"))


def test_lora_file_keys_alpha_and_metadata(tiny, images, tmp_path):
    result = train(config(tiny, images, tmp_path / "out", train={"max_steps": 2}))
    assert result.steps == 2 and result.lora == tmp_path / "out" / "anima_lora.safetensors"
    with safe_open(str(result.lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_blocks_0_self_attn_q_proj.alpha")
        down = f.get_tensor("lora_unet_blocks_1_mlp_layer2.lora_down.weight")
    modules = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_output_proj",
               "cross_attn_q_proj", "cross_attn_k_proj", "cross_attn_v_proj", "cross_attn_output_proj",
               "mlp_layer1", "mlp_layer2"]
    expected = {f"lora_unet_blocks_{b}_{m}.{s}" for b in range(2) for m in modules
                for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys == expected
    assert float(alpha) == 4.0 and down.shape[0] == 4 and down.dtype == torch.bfloat16
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0" and meta["ss_steps"] == "2"
    assert meta["modelspec.architecture"] == "anima/lora" and json.loads(meta["ss_resolution"]) == [64]
    monitor = json.loads((tmp_path / "out" / "monitor_state.json").read_text())
    assert monitor["step"] == 2 and len(monitor["losses"]) == 2
    assert (tmp_path / "out" / "loss_curve.png").exists()
    assert (tmp_path / "out" / "samples" / "vae_roundtrip.png").exists()


def test_loss_falls_when_overfitting_four_images(tiny, images, tmp_path):
    before = fixed_eval_loss(tiny, images)
    result = train(config(tiny, images, tmp_path / "out", train={"max_steps": 40, "batch_size": 4},
                          optimizer={"lr": 5e-3}, timestep_sampler={"type": "uniform"}))
    after = fixed_eval_loss(tiny, images, result.lora)
    assert after < 0.9 * before, (before, after)


def test_resume_is_bit_exact(tiny, images, tmp_path):
    base = dict(train={"max_steps": 6, "batch_size": 1, "grad_accum": 2},
                output={"save_state_every_n_steps": 3, "keep_states": 0})
    full = train(config(tiny, images, tmp_path / "a", **base))
    states = sorted((tmp_path / "a" / "state").iterdir())
    assert [s.name for s in states] == ["step_00000003", "step_00000006"]
    info = json.loads((states[0] / "state.json").read_text())
    assert (info["epoch"], info["batch_in_epoch"]) == (1, 2)  # 2 steps per epoch: step 3 is mid-epoch
    resumed = train(config(tiny, images, tmp_path / "b", **base), resume=states[0])
    assert resumed.steps == full.steps == 6
    a, b = adapter_tensors(full.state), adapter_tensors(resumed.state)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_auto_picks_the_newest_complete_state(tiny, images, tmp_path):
    out = tmp_path / "out"
    train(config(tiny, images, out, train={"max_steps": 2}))
    (out / "state" / ".step_00000009.tmp").mkdir()  # an interrupted write is never picked
    result = train(config(tiny, images, out, train={"max_steps": 4}), resume="auto")
    assert result.steps == 4
    monitor = json.loads((out / "monitor_state.json").read_text())
    assert monitor["step"] == 4


def test_grad_accum_tail_group_still_steps(tiny, tmp_path):
    three = write_shapes_dataset(tmp_path / "three", n=3)
    result = train(config(tiny, three, tmp_path / "out",
                          train={"max_steps": None, "epochs": 2, "batch_size": 1, "grad_accum": 2}))
    assert result.steps == 4  # groups of 2 + 1 per epoch


class NaNOnSecondCall:
    """A loss plugin whose second micro-batch loss is NaN."""

    def __init__(self):
        self.calls = 0

    def compute(self, pred, target, t):
        self.calls += 1
        out = (pred - target).pow(2)
        return out * float("nan") if self.calls == 2 else out


def test_nan_in_one_micro_batch_skips_only_its_backward(tiny, images, tmp_path):
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
    result = train(config(tiny, images, tmp_path / "out", loss={"type": "nan_once"},
                          train={"max_steps": 3, "batch_size": 1, "grad_accum": 2}), registry=host.registry)
    assert result.steps == 3  # the group with the NaN micro-batch still stepped on its other micro-batch
    assert result.skipped_nonfinite == 1
    tensors = adapter_tensors(result.state)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_up" in k)


def test_two_runs_do_not_share_outputs_or_caches(tiny, images, tmp_path):
    a = train(config(tiny, images, tmp_path / "a", train={"max_steps": 1, "seed": 1}))
    b = train(config(tiny, images, tmp_path / "b", train={"max_steps": 1, "seed": 2},
                     dataset={"resolution": [48]}))
    entries_a = {p.name for p in (tmp_path / "a" / "cache").rglob("*.safetensors")}
    entries_b = {p.name for p in (tmp_path / "b" / "cache").rglob("*.safetensors")}
    assert entries_a and entries_b
    assert entries_a.isdisjoint(entries_b)  # another resolution is another cache key, never a reused latent
    la, lb = load_file(str(a.lora)), load_file(str(b.lora))
    assert any(not torch.equal(la[k], lb[k]) for k in la if "lora_down" in k)


def _write_config(tmp_path, cfg) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigint_saves_a_loadable_state_and_exits_130(tiny, images, tmp_path):
    out = tmp_path / "out"
    path = _write_config(tmp_path, config(tiny, images, out, train={"max_steps": 100000, "batch_size": 1}))
    env = {k: v for k, v in os.environ.items() if k != "ANIMA_DISABLE_PLUGINS"}
    proc = subprocess.Popen([sys.executable, "-m", "anima_core", "train", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    monitor = out / "monitor_state.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if monitor.exists() and json.loads(monitor.read_text()).get("step", 0) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    states = sorted((out / "state").iterdir())
    assert len(states) == 1
    from anima_core.training.state import load_state

    info, tensors, optim = load_state(states[0])
    assert info["global_step"] >= 2 and tensors and "optimizer" in optim
    assert (out / "anima_lora_interrupted.safetensors").exists()


def test_train_command_reports_config_errors_before_loading_models(tmp_path, anima):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {transformer: /nope.safetensors}\ndataset: {path: /no/such/folder}\n"
                   "optimizer: {lr: -1}\n")
    result = anima("train", bad)
    assert result.returncode == 2 and "optimizer.lr" in result.stderr and "Traceback" not in result.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text("model: {transformer: /nope.safetensors}\ndataset: {path: /no/such/folder}\n")
    result = anima("train", missing)
    assert result.returncode == 2
    assert "model.transformer: not found: /nope.safetensors" in result.stderr
    assert "model.vae: not set" in result.stderr and "Traceback" not in result.stderr


def test_two_processes_under_torchrun_hold_identical_weights(tiny, images, tmp_path):
    out = tmp_path / "out"
    path = _write_config(tmp_path, config(tiny, images, out, train={"max_steps": 3, "batch_size": 1, "cpu": True}))
    env = {**{k: v for k, v in os.environ.items() if k != "ANIMA_DISABLE_PLUGINS"},
           "ANIMA_CHECK_RANK_SYNC": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "anima_core",
           "train", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank sync check: 2 processes held identical adapter weights after each of 3 steps" in result.stderr
    assert result.stderr.count("rank sync check") == 1  # only rank 0 logs
    assert json.loads((out / "monitor_state.json").read_text())["step"] == 3
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["anima_lora.safetensors"]


def test_text_encoder_cache_trains_identically(tiny, images, tmp_path):
    plain = train(config(tiny, images, tmp_path / "a", train={"max_steps": 2}))
    cached = train(config(tiny, images, tmp_path / "b", train={"max_steps": 2},
                          dataset={"cache_text_encoder": True}))
    a, b = adapter_tensors(plain.state), adapter_tensors(cached.state)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_gradient_check_finds_one_bad_value_among_many_tensors(bad):
    from anima_core.training.phases.loop import _grads_finite

    params = [torch.nn.Parameter(torch.zeros(8, 16)) for _ in range(40)]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 1e30 if i == 3 else 0.5)  # huge but finite: a 2-norm would overflow here
    if bad is not None:
        params[27].grad[5, 11] = bad
    assert _grads_finite(params) is (bad is None)
    assert _grads_finite([torch.nn.Parameter(torch.zeros(2))]) is False  # no gradients at all: nothing to step
