"""Conformance base classes: subclass one per variant, set ``name`` (and ``options``), and pytest runs the checks
every variant of that kind must pass."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from anima_core.kinds import Kind
from anima_core.plugin_host import Registry, make_host
from anima_core.specs import VariantSpec


@functools.lru_cache(maxsize=1)
def installed_registry() -> Registry:
    """The registry of the installed distributions, loaded strictly (a broken plugin fails the tests)."""
    return make_host(strict=True).registry


class VariantConformance:
    kind: ClassVar[Kind]
    name: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}

    @property
    def spec(self) -> VariantSpec:
        return installed_registry().spec(self.kind, self.name)

    def make_options(self) -> Any:
        return self.spec.options.model_validate({"type": self.name, **self.options})

    def test_registered_with_a_description(self) -> None:
        assert self.spec.description.strip(), f"{self.kind} '{self.name}' needs a one-line description"
        assert "\n" not in self.spec.description.strip()

    def test_options_round_trip_through_json(self) -> None:
        opts = self.make_options()
        again = self.spec.options.model_validate_json(opts.model_dump_json())
        assert again == opts
        assert again.type == self.name

    def test_options_validate_against_their_json_schema(self) -> None:
        jsonschema = pytest.importorskip("jsonschema")
        schema = self.spec.options.model_json_schema()
        jsonschema.validate(json.loads(self.make_options().model_dump_json()), schema)
        assert schema["properties"]["type"].get("const", (schema["properties"]["type"].get("enum") or [None])[0]) \
            == self.name
        for key, prop in schema["properties"].items():
            assert "group" in prop and "advanced" in prop, f"field {key!r} lacks UI metadata"

    def test_options_reject_unknown_keys(self) -> None:
        from pydantic import ValidationError

        with pytest.raises(ValidationError):
            self.spec.options.model_validate({"type": self.name, **self.options, "no_such_option_xyz": 1})


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(8, 16)
        self.hidden = nn.Linear(16, 16)
        self.proj_out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(torch.tanh(self.hidden(torch.tanh(self.proj_in(x)))))


class AdapterConformance(VariantConformance):
    """Set ``options`` so the adapter targets the Linears of :meth:`make_model` (every Linear by default)."""

    kind = "adapter"
    options: ClassVar[dict[str, Any]] = {"targets": [".*"]}

    def make_model(self) -> nn.Module:
        torch.manual_seed(0)
        return _TinyNet()

    def _adapted(self):
        model = self.make_model()
        for p in model.parameters():
            p.requires_grad_(False)
        adapter = self.spec.build(self.make_options())
        adapter.inject(model)
        return model, adapter

    def _train_one_step(self, model, adapter, x) -> None:
        params = [p for g in adapter.get_param_groups(0.0) for p in g["params"]]
        opt = torch.optim.SGD(params, lr=0.5)
        loss = (model(x) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()

    def test_inject_adds_trainable_parameters_only(self) -> None:
        model, adapter = self._adapted()
        groups = adapter.get_param_groups(0.01)
        params = [p for g in groups for p in g["params"]]
        assert params and all(p.requires_grad for p in params)
        assert not any(p.requires_grad for p in model.parameters())

    def test_fresh_adapter_is_identity_and_training_changes_output(self) -> None:
        reference = self.make_model()
        model, adapter = self._adapted()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(x), reference(x))
        self._train_one_step(model, adapter, x)
        assert not torch.allclose(model(x), reference(x))

    def test_save_and_load_reproduce_outputs(self, tmp_path: Path) -> None:
        model, adapter = self._adapted()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
        self._train_one_step(model, adapter, x)
        adapter.save(tmp_path / "adapter.safetensors")
        model2, adapter2 = self._adapted()
        adapter2.load(tmp_path / "adapter.safetensors")
        torch.testing.assert_close(model2(x), model(x))

    def test_merged_and_unmerged_outputs_agree(self) -> None:
        model, adapter = self._adapted()
        if not hasattr(adapter, "merge"):
            pytest.skip("adapter does not support merging")
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
        self._train_one_step(model, adapter, x)
        with torch.no_grad():
            unmerged = model(x)
            adapter.merge()
            merged = model(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


class OptimizerConformance(VariantConformance):
    kind = "optimizer"

    def _params(self) -> list[nn.Parameter]:
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]

    def _step(self, opt, params, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _build(self, params):
        opt = self.spec.build(self.make_options(), [{"params": params}])
        if hasattr(opt, "train"):
            opt.train()
        return opt

    def test_one_step_changes_parameters(self) -> None:
        params = self._params()
        before = [p.detach().clone() for p in params]
        opt = self._build(params)
        self._step(opt, params, 1)
        assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        assert all(torch.isfinite(p).all() for p in params)

    def test_state_dict_round_trip_continues_identically(self) -> None:
        params = self._params()
        opt = self._build(params)
        self._step(opt, params, 1)
        state = copy.deepcopy(opt.state_dict())
        clone = [nn.Parameter(p.detach().clone()) for p in params]
        opt2 = self._build(clone)
        opt2.load_state_dict(state)
        if hasattr(opt2, "train"):
            opt2.train()
        self._step(opt, params, 2)
        self._step(opt2, clone, 2)
        for a, b in zip(params, clone):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class LRSchedulerConformance(VariantConformance):
    kind = "lr_scheduler"
    total_steps: ClassVar[int] = 20
    base_lr: ClassVar[float] = 0.1

    def _build(self):
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=self.base_lr)
        return opt, self.spec.build(self.make_options(), opt, self.total_steps)

    def _lrs(self, opt, sched, n: int) -> list[float]:
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    def test_learning_rates_are_finite_and_bounded(self) -> None:
        opt, sched = self._build()
        lrs = self._lrs(opt, sched, self.total_steps)
        assert all(0.0 <= lr <= self.base_lr * (1 + 1e-9) for lr in lrs), lrs

    def test_state_dict_round_trip_resumes_the_schedule(self) -> None:
        opt, sched = self._build()
        head = self._lrs(opt, sched, 7)
        state = copy.deepcopy(sched.state_dict())
        tail = self._lrs(opt, sched, 5)
        opt2, sched2 = self._build()
        sched2.load_state_dict(state)
        opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
        assert self._lrs(opt2, sched2, 5) == pytest.approx(tail)
        assert head


class TimestepSamplerConformance(VariantConformance):
    kind = "timestep_sampler"
    total_steps: ClassVar[int] = 100

    def _build(self):
        return self.spec.build(self.make_options(), total_steps=self.total_steps)

    def test_samples_have_the_right_shape_and_range(self) -> None:
        t = self._build().sample(64, generator=torch.Generator().manual_seed(0))
        assert t.shape == (64,)
        assert torch.isfinite(t).all() and (t > 0).all() and (t < 1).all()

    def test_same_generator_seed_gives_same_samples(self) -> None:
        a = self._build().sample(16, generator=torch.Generator().manual_seed(5))
        b = self._build().sample(16, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_state_dict_round_trips(self) -> None:
        sampler = self._build()
        if not hasattr(sampler, "state_dict"):
            pytest.skip("stateless sampler without state_dict")
        state = sampler.state_dict()
        other = self._build()
        other.load_state_dict(copy.deepcopy(state))
        assert other.state_dict().keys() == state.keys()


class InferenceSamplerConformance(VariantConformance):
    kind = "inference_sampler"

    def test_constant_denoiser_ends_on_its_estimate(self) -> None:
        from anima_core.samplers import simple_sigmas

        target = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        calls: list[torch.Tensor] = []

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            assert sigma.shape == (x_t.shape[0],)
            calls.append(sigma)
            return target

        sampler = self.spec.build(self.make_options())
        out = sampler.sample(denoise, x, simple_sigmas(6), generator=torch.Generator().manual_seed(2))
        assert out.shape == x.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out, target)
        assert len(calls) == 6

    def test_is_deterministic_for_a_seeded_generator(self) -> None:
        from anima_core.samplers import simple_sigmas

        x = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return 0.5 * x_t  # depends on x so noise injected along the way matters

        sampler = self.spec.build(self.make_options())
        a = sampler.sample(denoise, x.clone(), simple_sigmas(5), generator=torch.Generator().manual_seed(3))
        b = sampler.sample(denoise, x.clone(), simple_sigmas(5), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class LossConformance(VariantConformance):
    kind = "loss"

    def test_per_element_loss_shape_sign_and_zero(self) -> None:
        g = torch.Generator().manual_seed(0)
        pred = torch.randn(2, 4, 1, 8, 8, generator=g, requires_grad=True)
        target = torch.randn(2, 4, 1, 8, 8, generator=g)
        t = torch.rand(2, generator=g)
        loss_fn = self.spec.build(self.make_options())
        loss = loss_fn.compute(pred, target, t)
        assert loss.shape == pred.shape
        assert torch.isfinite(loss).all() and (loss >= 0).all()
        loss.mean().backward()
        assert pred.grad is not None and pred.grad.abs().sum() > 0
        zero = loss_fn.compute(target, target, t)
        assert torch.count_nonzero(zero) == 0
