"""anima-optim-prodigy with core: conformance, training runs, schedule-free eval/train, validation, resume."""

import pytest
import torch
from safetensors.torch import load_file

from anima_core.config.loading import ConfigError, validate_config
from anima_core.plugin_host import make_host
from anima_core.testing import OptimizerConformance, installed_registry
from anima_core.testing.datasets import write_shapes_dataset
from anima_core.testing.tiny import write_tiny_model_set
from anima_core.testing.training import fixed_eval_loss, tiny_train_config
from anima_core.training.api import train


class TestProdigy(OptimizerConformance):
    name = "prodigy"


class TestProdigyPlusScheduleFree(OptimizerConformance):
    name = "prodigy_plus_schedulefree"


def test_registered_through_the_entry_point_with_capabilities():
    host = make_host(strict=True)
    record = next(r for r in host.records if r.distribution == "anima-optim-prodigy")
    assert record.status == "loaded" and record.name == "anima_optim_prodigy"
    reg = host.registry
    assert reg.get("optimizer", "prodigy").plugin is record
    assert reg.spec("optimizer", "prodigy").capabilities == {"adaptive_lr"}
    assert reg.spec("optimizer", "prodigy_plus_schedulefree").capabilities == {"adaptive_lr", "schedule_free"}


def test_validation_rules():
    reg = installed_registry()
    with pytest.raises(ConfigError, match="schedule-free: only the 'constant' scheduler"):
        validate_config({"optimizer": {"type": "prodigy_plus_schedulefree"}, "lr_scheduler": {"type": "cosine"}},
                        reg)
    ok = validate_config({"optimizer": {"type": "prodigy", "lr": 0.5}, "lr_scheduler": {"type": "cosine"}}, reg)
    assert [w.path for w in ok.warnings] == ["optimizer.lr"]  # a warning, the value is kept
    assert ok.config.optimizer.lr == 0.5
    stuck = validate_config({"optimizer": {"type": "prodigy_plus_schedulefree", "d_coef": 0.5}}, reg)
    assert any(w.path == "optimizer.d_coef" and "stuck" in w.message for w in stuck.warnings)
    with pytest.raises(ConfigError, match="fused backward pass"):
        validate_config({"optimizer": {"type": "prodigy_plus_schedulefree", "fused_back_pass": True}}, reg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4)


@pytest.mark.parametrize("name", ["prodigy", "prodigy_plus_schedulefree"])
def test_a_tiny_training_run_lowers_the_loss_and_reports_d(tiny, images, tmp_path, name, capsys):
    import json

    before = fixed_eval_loss(tiny, images)
    result = train(tiny_train_config(tiny, images, tmp_path / "out", optimizer={"type": name, "lr": 1.0},
                                     train={"max_steps": 40, "batch_size": 4},
                                     timestep_sampler={"type": "uniform"}))
    assert fixed_eval_loss(tiny, images, result.lora) < 0.9 * before
    metrics = json.loads((tmp_path / "out" / "monitor_state.json").read_text())["metrics"]
    assert metrics and metrics[-1]["optimizer/d"] > 1e-6  # d grew from d0
    assert metrics[-1]["optimizer/effective_lr"] > 0
    assert " d " in capsys.readouterr().err  # and on the progress line


def test_schedule_free_weights_are_swapped_for_saves_and_training_continues(tiny, images, tmp_path, monkeypatch):
    from anima_core.training import checkpointing

    seen = []
    real_save = checkpointing.outputs.save_lora

    def spy(ctx, name):
        opt = ctx.optimization.optimizer
        params = ctx.optimization.params
        eval_weights = [p.detach().clone() for p in params]
        mode_at_save = opt.param_groups[0]["train_mode"]
        opt.train()
        train_weights = [p.detach().clone() for p in params]
        opt.eval()
        seen.append((name, mode_at_save, any(not torch.equal(a, b) for a, b in zip(eval_weights, train_weights))))
        return real_save(ctx, name)

    monkeypatch.setattr(checkpointing.outputs, "save_lora", spy)
    result = train(tiny_train_config(tiny, images, tmp_path / "out",
                                     optimizer={"type": "prodigy_plus_schedulefree", "lr": 1.0},
                                     train={"max_steps": 6, "batch_size": 2},
                                     output={"save_every_n_steps": 3}))
    assert result.steps == 6
    assert [s[0] for s in seen] == ["anima_lora_step000003", "anima_lora_step000006", "anima_lora"]
    assert all(mode is False for _, mode, _ in seen)  # saved in eval mode: the averaged weights
    assert all(differ for _, _, differ in seen)  # eval (x) and train (y) weights really differ


def test_periodic_saves_do_not_change_a_schedule_free_run(tiny, images, tmp_path):
    # A save swaps the schedule-free weights to eval (averaged) and back; the swap back must be exact, or every
    # save nudges the run.
    sections = dict(optimizer={"type": "prodigy_plus_schedulefree", "lr": 1.0}, train={"max_steps": 6})
    quiet = train(tiny_train_config(tiny, images, tmp_path / "a", **sections))
    saving = train(tiny_train_config(tiny, images, tmp_path / "b", **sections,
                                     output={"save_every_n_steps": 1, "save_state_every_n_steps": 2}))
    a, b = load_file(str(quiet.lora)), load_file(str(saving.lora))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_is_bit_exact(tiny, images, tmp_path):
    sections = dict(optimizer={"type": "prodigy_plus_schedulefree", "lr": 1.0},
                    train={"max_steps": 4, "batch_size": 1, "grad_accum": 2},
                    output={"save_state_every_n_steps": 2, "keep_states": 0})
    full = train(tiny_train_config(tiny, images, tmp_path / "a", **sections))
    resumed = train(tiny_train_config(tiny, images, tmp_path / "b", **sections),
                    resume=tmp_path / "a" / "state" / "step_00000002")
    a, b = load_file(str(full.state / "adapter.safetensors")), load_file(str(resumed.state / "adapter.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
