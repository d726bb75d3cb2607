"""anima-infonoise with core: entry point, conformance, config validation, and real training runs on the tiny
model set (activation at default options, resume bit-exact with the sampler state, loss-type independence of the
recorded MSE, two processes under torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from anima_core.config.loading import ConfigError, validate_config
from anima_core.plugin_host import make_host
from anima_core.testing import TimestepSamplerConformance, installed_registry
from anima_core.testing.datasets import write_shapes_dataset
from anima_core.testing.tiny import write_tiny_model_set
from anima_core.testing.training import tiny_train_config
from anima_core.training.api import train
from anima_infonoise.sampler import InfoNoiseSampler
from safetensors.torch import load_file

HERE = Path(__file__).parent
# Options that activate within a few steps of a tiny run (the defaults need ~700 samples, see the README).
QUICK = {"type": "infonoise", "bins": 4, "warmup_steps": 2, "refresh_every": 2, "min_per_bin": 1, "explore": 0.75}


class TestInfoNoise(TimestepSamplerConformance):
    name = "infonoise"


class TestInfoNoiseQuick(TimestepSamplerConformance):
    name = "infonoise"
    options = {k: v for k, v in QUICK.items() if k != "type"} | {"base": {"type": "mode"}}


def test_registered_through_the_entry_point():
    host = make_host(strict=True)
    record = next(r for r in host.records if r.distribution == "anima-infonoise")
    assert record.status == "loaded" and record.name == "anima_infonoise"
    assert host.registry.get("timestep_sampler", "infonoise").plugin is record


def test_plugin_module_does_not_import_torch():
    code = ("import sys, anima_infonoise.plugin; "
            "sys.exit('torch imported' if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_validation():
    reg = installed_registry()
    ok = validate_config({"timestep_sampler": {"type": "infonoise", "base": {"type": "logit_normal", "shift": 3}}},
                         reg)
    assert ok.config.timestep_sampler.base.shift == 3 and ok.warnings == []
    warned = validate_config({"timestep_sampler": {"type": "infonoise", "explore": 0},
                              "train": {"loss_weighting": {"scheme": "min_snr"}}}, reg)
    assert {w.path for w in warned.warnings} == {"timestep_sampler.explore", "train.loss_weighting.scheme"}
    with pytest.raises(ConfigError, match="timestep_sampler"):
        validate_config({"timestep_sampler": {"type": "infonoise", "onset_fraction": 1.5}}, reg)
    with pytest.raises(ConfigError, match="t_min"):
        validate_config({"timestep_sampler": {"type": "infonoise", "t_min": 0.5, "t_max": 0.4}}, reg)
    with pytest.raises(ConfigError):
        validate_config({"timestep_sampler": {"type": "infonoise", "base": {"type": "infonoise"}}}, reg)


def test_bad_options_exit_2_with_one_message(tmp_path, anima):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("timestep_sampler: {type: infonoise, bins: 1}\n")
    result = anima("config", "validate", cfg)
    assert result.returncode == 2 and "timestep_sampler" in result.stderr and "bins" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=8)


def _metrics(out: Path) -> list[dict]:
    return json.loads((out / "monitor_state.json").read_text())["metrics"]


@pytest.mark.slow
def test_default_options_activate_within_warmup_and_a_few_refreshes(tiny, images, tmp_path):
    """The reference never activates at its defaults; here, with every infonoise option at its default and the
    default base (core's logit_normal), a 300-step tiny run at batch 4 gets its CDF at the first refresh after
    warm-up (step 200: 800 samples ≥ the ~700 the defaults need) or one period later, and status() shows it in
    monitor_state.json."""
    out = tmp_path / "out"
    result = train(tiny_train_config(tiny, images, out, timestep_sampler={"type": "infonoise"},
                                     train={"max_steps": 300, "batch_size": 4}, output={"log_every": 50}))
    assert result.steps == 300
    metrics = _metrics(out)
    assert len(metrics) == 300 and {"timestep_sampler/cdf_ready", "timestep_sampler/refresh_attempts",
                                    "timestep_sampler/refresh_degraded_count",
                                    "timestep_sampler/internal_step"} <= set(metrics[0])
    ready_at = next(m["step"] for m in metrics if m["timestep_sampler/cdf_ready"] == 1.0)
    warmup, period = 200, 100  # max(200, 20% of 300); M
    assert ready_at % period == 0 and warmup <= ready_at <= warmup + period, ready_at
    last = metrics[-1]
    assert last["timestep_sampler/refresh_degraded_count"] == 0
    assert last["timestep_sampler/refresh_attempts"] == (300 - ready_at) // period + 1
    assert last["timestep_sampler/internal_step"] == 300  # one record per micro-batch
    state = torch.load(result.state / "optim.pt", weights_only=True)["timestep_sampler"]
    assert state["cdf"] is not None and state["last_refresh_status"] == "ok"


@pytest.mark.slow
def test_resume_is_bit_exact_including_the_sampler_state(tiny, images, tmp_path):
    sections = dict(timestep_sampler=QUICK, train={"max_steps": 10, "batch_size": 1, "grad_accum": 2},
                    output={"save_state_every_n_steps": 6, "keep_states": 0})
    full = train(tiny_train_config(tiny, images, tmp_path / "a", **sections))
    mid = tmp_path / "a" / "state" / "step_00000006"
    saved = torch.load(mid / "optim.pt", weights_only=True)["timestep_sampler"]
    assert saved["cdf"] is not None  # resumed warm: the CDF path and its state are what is being checked
    resumed = train(tiny_train_config(tiny, images, tmp_path / "b", **sections), resume=mid)
    a, b = load_file(str(full.state / "adapter.safetensors")), load_file(str(resumed.state / "adapter.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = torch.load(full.state / "optim.pt", weights_only=True)["timestep_sampler"]
    sb = torch.load(resumed.state / "optim.pt", weights_only=True)["timestep_sampler"]
    assert sa == sb and sa["refresh_attempts"] > saved["refresh_attempts"]


@pytest.mark.slow
def test_recorded_mse_does_not_depend_on_the_loss_type(tiny, images, tmp_path, monkeypatch):
    seen: dict[str, list] = {}
    real = InfoNoiseSampler.record

    def spy(self, t, raw_mse):
        seen.setdefault(self._run, []).append((t.clone(), raw_mse.clone()))
        return real(self, t, raw_mse)

    monkeypatch.setattr(InfoNoiseSampler, "record", spy)
    for loss in ("mse", "huber"):
        monkeypatch.setattr(InfoNoiseSampler, "_run", loss, raising=False)
        train(tiny_train_config(tiny, images, tmp_path / loss, timestep_sampler={"type": "infonoise"},
                                loss={"type": loss}, train={"max_steps": 1, "batch_size": 4}))
    (t_mse, mse), (t_huber, huber) = seen["mse"][0], seen["huber"][0]
    assert len(mse) == 4
    assert torch.equal(t_mse, t_huber) and torch.equal(mse, huber)


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "ANIMA_DISABLE_PLUGINS"}, "OMP_NUM_THREADS": "1",
           "ANIMA_CHECK_RANK_SYNC": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_two_processes_exchange_records_and_hold_the_same_state(tmp_path):
    result = _torchrun(str(HERE / "two_process_records.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (len(r0["local_records"]), len(r1["local_records"])) == (3, 5)  # different counts per rank
    assert r0["state"] == r1["state"]  # ... the same state after the exchange
    expected: list[list[float]] = [[] for _ in range(4)]
    for bins, rates in r0["local_records"] + r1["local_records"]:  # applied in rank order
        for k, rate in zip(bins, rates):
            expected[k].append(rate)
    assert r0["state"]["fifos"] == expected and r0["state"]["internal_step"] == 8
    assert r0["state"]["cdf"] is not None and torch.equal(r0["samples"], r1["samples"])
    for r in (0, 1):
        assert "processes hold different distributions" in (tmp_path / f"mismatch{r}.txt").read_text()


@pytest.mark.slow
def test_two_process_training_run_activates_and_stays_in_sync(tiny, images, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_train_config(tiny, images, out, timestep_sampler=QUICK,
                            train={"max_steps": 6, "batch_size": 1, "cpu": True})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _torchrun("-m", "anima_core", "train", str(path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank sync check: 2 processes held identical adapter weights after each of 6 steps" in result.stderr
    metrics = _metrics(out)
    assert metrics[-1]["timestep_sampler/cdf_ready"] == 1.0
    assert metrics[-1]["timestep_sampler/internal_step"] == 12  # both ranks' records, on rank 0
