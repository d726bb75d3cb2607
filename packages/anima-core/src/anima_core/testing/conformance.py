"""Conformance base classes: subclass one per variant, set ``name`` (and ``options``), and pytest runs the checks
every variant of that kind must pass."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from anima_core.kinds import Kind
from anima_core.plugin_host import Registry, make_host
from anima_core.specs import VariantSpec


_registry_cache: list[Any] = []


def installed_registry() -> Registry:
    """The registry of the installed distributions, loaded strictly (a broken plugin fails the tests).

    Loaded once per test session: a plugin that fails is imported (and reported) once, and every later test fails
    with the same error instead of importing it again."""
    if not _registry_cache:
        try:
            _registry_cache.append(make_host(strict=True).registry)
        except Exception as exc:  # noqa: BLE001 - cached and re-raised as is
            _registry_cache.append(exc)
    found = _registry_cache[0]
    if isinstance(found, Exception):
        raise found
    return found


class VariantConformance:
    """Checks every variant of any kind passes. Subclass a kind's class below, set ``name`` (and ``options``: the
    variant's options without ``type``); pytest collects the ``test_*`` methods."""

    kind: ClassVar[Kind]
    name: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}

    def registry(self) -> Registry:
        """Where the variant is looked up: the installed distributions (override to test an in-process plugin)."""
        return installed_registry()

    @property
    def spec(self) -> VariantSpec:
        return self.registry().spec(self.kind, self.name)

    def make_options(self) -> Any:
        return self.spec.options.model_validate({"type": self.name, **self.options})

    def test_registered_with_a_description(self) -> None:
        """The spec has a one-line ``description``."""
        assert self.spec.description.strip(), f"{self.kind} '{self.name}' needs a one-line description"
        assert "\n" not in self.spec.description.strip()

    def test_options_round_trip_through_json(self) -> None:
        """Options survive ``model_dump_json`` → ``model_validate_json`` (configs and states store them as JSON)."""
        opts = self.make_options()
        again = self.spec.options.model_validate_json(opts.model_dump_json())
        assert again == opts
        assert again.type == self.name

    def test_options_validate_against_their_json_schema(self) -> None:
        """The options' JSON schema accepts their dump, pins ``type`` and gives every field UI metadata."""
        jsonschema = pytest.importorskip("jsonschema")
        schema = self.spec.options.model_json_schema()
        jsonschema.validate(json.loads(self.make_options().model_dump_json()), schema)
        assert schema["properties"]["type"].get("const", (schema["properties"]["type"].get("enum") or [None])[0]) \
            == self.name
        for key, prop in schema["properties"].items():
            assert "group" in prop and "advanced" in prop, f"field {key!r} lacks UI metadata"

    def test_options_reject_unknown_keys(self) -> None:
        """A typo in the options is an error, never ignored."""
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


# What core passes to save() for a LoRA file (plus its ss_*/modelspec.* keys); the kit checks these survive.
_KIT_METADATA = {"ss_steps": "7", "anima_adapter": "kit", "anima_conformance": "1"}


def _is_scalar(t: torch.Tensor) -> bool:
    return t.numel() == 1


class AdapterConformance(VariantConformance):
    """Drives the adapter exactly as the training runtime does (see :class:`anima_core.protocols.AdapterProtocol`):
    ``inject(model)`` on a frozen CPU model, ``get_param_groups(weight_decay)`` into a torch optimizer,
    ``save(path, metadata, dtype=...)`` for LoRA files, ``save(path, {})`` + ``load(path)`` for states (load after
    the optimizer is built), and the optional hooks with a :class:`~anima_core.protocols.StepContext`.

    Set ``options`` so the adapter targets the Linears of :meth:`make_model` (every Linear by default)."""

    kind = "adapter"
    options: ClassVar[dict[str, Any]] = {"targets": [".*"]}
    save_dtype: ClassVar[torch.dtype] = torch.bfloat16  # output.save_dtype's default

    def make_model(self) -> nn.Module:
        torch.manual_seed(0)
        return _TinyNet()

    def _adapted(self):
        model = self.make_model()
        model.requires_grad_(False)  # core freezes the base before inject
        adapter = self.spec.build(self.make_options())
        adapter.inject(model)
        return model, adapter

    def _optimizer(self, adapter, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        from anima_core.training.phases.optimizer import _param_groups  # the runtime's own grouping

        return torch.optim.AdamW(_param_groups(adapter, weight_decay), lr=0.05, weight_decay=weight_decay)

    def _train_one_step(self, model, adapter, x, opt=None) -> None:
        opt = opt or self._optimizer(adapter)
        loss = (model(x) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _save_lora(self, adapter, path: Path) -> None:
        try:
            adapter.save(path, dict(_KIT_METADATA), dtype=self.save_dtype)
        except TypeError as exc:
            pytest.fail(f"the runtime saves LoRA files with save(path, metadata, dtype=torch.dtype): {exc}; "
                        f"declare save(self, path, metadata=None, *, dtype=None)")

    def test_inject_adds_trainable_parameters_only(self) -> None:
        """inject leaves the base frozen; get_param_groups(weight_decay) returns torch param-group dicts of fp32
        trainable tensors, the same tensors on every call."""
        model, adapter = self._adapted()
        groups = adapter.get_param_groups(0.01)
        assert isinstance(groups, list) and all(isinstance(g, dict) and "params" in g for g in groups), groups
        params = [p for g in groups for p in g["params"]]
        assert params and all(isinstance(p, torch.Tensor) and p.requires_grad for p in params)
        assert all(p.dtype == torch.float32 for p in params), "create adapter parameters in fp32"
        assert not any(p.requires_grad for p in model.parameters())
        again = [p for g in adapter.get_param_groups(0.01) for p in g["params"]]
        assert [id(p) for p in again] == [id(p) for p in params]
        self._optimizer(adapter, weight_decay=0.01)  # the groups are valid torch.optim param groups

    def test_fresh_adapter_is_identity_and_training_changes_output(self) -> None:
        """A fresh adapter does not change the output; one optimizer step does."""
        reference = self.make_model()
        model, adapter = self._adapted()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(x), reference(x))
        self._train_one_step(model, adapter, x)
        assert not torch.allclose(model(x), reference(x))

    def test_lora_file_save_takes_metadata_and_dtype(self, tmp_path: Path) -> None:
        """save(path, metadata, dtype=...) as the runtime calls it for LoRA files: a safetensors file whose
        metadata holds the given keys and whose tensors are in ``dtype`` (scalars such as alpha may stay fp32)."""
        from safetensors import safe_open

        model, adapter = self._adapted()
        self._train_one_step(model, adapter, torch.randn(5, 8, generator=torch.Generator().manual_seed(4)))
        path = tmp_path / "lora.safetensors"
        self._save_lora(adapter, path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert tensors, "save wrote no tensors"
        for key, value in _KIT_METADATA.items():
            if key != "anima_adapter":  # an adapter may name itself
                assert meta.get(key) == value, f"metadata {key!r} passed to save is missing from the file"
        wrong = {k: v.dtype for k, v in tensors.items()
                 if v.is_floating_point() and not _is_scalar(v) and v.dtype != self.save_dtype}
        assert not wrong, f"save(..., dtype={self.save_dtype}) left tensors in other dtypes: {wrong}"
        assert all(torch.isfinite(v.float()).all() for v in tensors.values())

    def test_save_and_load_reproduce_outputs(self, tmp_path: Path) -> None:
        """Resume as the runtime does: save(path, {}) writes the state; a fresh adapter is injected, its optimizer
        built, then load(path) restores the outputs in place (the optimizer's tensors keep training)."""
        model, adapter = self._adapted()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
        self._train_one_step(model, adapter, x)
        adapter.save(tmp_path / "adapter.safetensors", {})
        model2, adapter2 = self._adapted()
        opt2 = self._optimizer(adapter2)
        held = [p for g in opt2.param_groups for p in g["params"]]
        adapter2.load(tmp_path / "adapter.safetensors")
        torch.testing.assert_close(model2(x), model(x))
        after = [p for g in adapter2.get_param_groups(0.0) for p in g["params"]]
        assert {id(p) for p in after} == {id(p) for p in held}, \
            "load must copy into the existing parameters (the optimizer already holds them), not replace them"
        before_step = model2(x).detach()
        self._train_one_step(model2, adapter2, x, opt2)
        assert not torch.allclose(model2(x), before_step), "after load, the optimizer's tensors no longer matter"

    def test_optional_hooks_take_the_runtime_arguments(self) -> None:
        """on_step_begin / regularization_loss get a StepContext; excludes_weight_decay gets the names of
        ``network.named_parameters()`` (core needs ``network`` to call it)."""
        from anima_core.protocols import StepContext

        model, adapter = self._adapted()
        ctx = StepContext(global_step=0, total_steps=10, epoch=0,
                          sigma_t=torch.rand(5, generator=torch.Generator().manual_seed(5)), config=None)
        if hasattr(adapter, "on_step_begin"):
            adapter.on_step_begin(ctx)
        if hasattr(adapter, "regularization_loss"):
            reg = adapter.regularization_loss(ctx)
            assert reg is None or (isinstance(reg, torch.Tensor) and reg.dim() == 0 and torch.isfinite(reg))
        if hasattr(adapter, "excludes_weight_decay"):
            network = getattr(adapter, "network", None)
            assert isinstance(network, nn.Module), "excludes_weight_decay is only called for adapters with a network"
            for name, _ in network.named_parameters():
                assert isinstance(adapter.excludes_weight_decay(name), bool)
            self._optimizer(adapter, weight_decay=0.01)

    def test_merged_and_unmerged_outputs_agree(self) -> None:
        """Optional merge(): the merged model gives the unmerged output; unmerge() restores it."""
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
            if hasattr(adapter, "unmerge"):
                adapter.unmerge()
                torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


class OptimizerConformance(VariantConformance):
    """``build(options, param_groups)`` as the runtime calls it, with torch param-group dicts."""

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
        """One step with gradients moves the parameters and keeps them finite."""
        params = self._params()
        before = [p.detach().clone() for p in params]
        opt = self._build(params)
        self._step(opt, params, 1)
        assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        assert all(torch.isfinite(p).all() for p in params)

    def test_state_dict_round_trip_continues_identically(self) -> None:
        """An optimizer restored from ``state_dict()`` (as on resume) continues bit-identically."""
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
    """``build(options, optimizer, total_steps)`` stepped once after every optimizer step, as the runtime does."""

    kind = "lr_scheduler"
    total_steps: ClassVar[int] = 20
    base_lr: ClassVar[float] = 0.1

    def _build(self, **overrides: Any):
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=self.base_lr)
        options = self.spec.options.model_validate({"type": self.name, **self.options, **overrides})
        return opt, self.spec.build(options, opt, self.total_steps)

    def _lrs(self, opt, sched, n: int) -> list[float]:
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    def test_learning_rates_are_finite_and_bounded(self) -> None:
        """Every optimizer step's lr is in [0, the optimizer's lr]."""
        opt, sched = self._build()
        lrs = self._lrs(opt, sched, self.total_steps)
        assert all(0.0 <= lr <= self.base_lr * (1 + 1e-9) for lr in lrs), lrs

    def test_warmup_steps_are_applied_by_the_scheduler(self) -> None:
        """Core never applies ``warmup_steps``: with it, the first steps run at a lower lr than without."""
        warm = self._lrs(*self._build(warmup_steps=4), 4)
        cold = self._lrs(*self._build(warmup_steps=0), 4)
        assert sum(warm) < sum(cold), (warm, cold)

    def test_state_dict_round_trip_resumes_the_schedule(self) -> None:
        """A scheduler restored from ``state_dict()`` (as on resume) continues the same schedule."""
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
    """``build(options, total_steps=...)`` and ``sample(batch_size, generator=generator)`` as the loop calls them
    (t = σ fed to the DiT, t = 1 pure noise), plus the optional hooks with the loop's arguments."""

    kind = "timestep_sampler"
    total_steps: ClassVar[int] = 100

    def _build(self):
        return self.spec.build(self.make_options(), total_steps=self.total_steps)

    def test_samples_have_the_right_shape_and_range(self) -> None:
        """t is an fp32 CPU tensor of shape [batch_size], every value in (0, 1)."""
        t = self._build().sample(64, generator=torch.Generator().manual_seed(0))
        assert t.shape == (64,)
        assert t.dtype == torch.float32 and t.device.type == "cpu", (t.dtype, t.device)
        assert torch.isfinite(t).all() and (t > 0).all() and (t < 1).all()

    def test_same_generator_seed_gives_same_samples(self) -> None:
        """Every draw comes from ``generator``: the same seed gives the same t whatever the global RNG holds, and
        the global RNG is left untouched."""
        torch.manual_seed(123)
        a = self._build().sample(16, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(456)
        before = torch.get_rng_state()
        b = self._build().sample(16, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(torch.get_rng_state(), before), "sample() drew from the global RNG; use generator"

    def test_optional_hooks_take_the_loop_arguments(self) -> None:
        """record(t, raw_mse) with CPU fp32 [n] tensors after a micro-batch, maybe_refresh(global_step) and
        status() after an optimizer step."""
        sampler = self._build()
        g = torch.Generator().manual_seed(6)
        for step in range(1, 4):
            t = sampler.sample(4, generator=g)
            if hasattr(sampler, "record"):
                sampler.record(t.float(), torch.rand(4, generator=g))
            if hasattr(sampler, "maybe_refresh"):
                sampler.maybe_refresh(step)
            if hasattr(sampler, "status"):
                assert isinstance(sampler.status(), dict)

    def test_state_dict_round_trips(self) -> None:
        """Optional state_dict()/load_state_dict(state) round-trip (saved with states, restored on resume)."""
        sampler = self._build()
        if not hasattr(sampler, "state_dict"):
            pytest.skip("stateless sampler without state_dict")
        state = sampler.state_dict()
        other = self._build()
        other.load_state_dict(copy.deepcopy(state))
        assert other.state_dict().keys() == state.keys()


class InferenceSamplerConformance(VariantConformance):
    """``sample(denoise_fn, x, sigmas, generator=, callback=, shift=)`` as ``anima generate`` and previews call it."""

    kind = "inference_sampler"

    @staticmethod
    def _runtime_kw(seed: int) -> dict[str, Any]:
        return {"generator": torch.Generator().manual_seed(seed), "callback": lambda i, total, x0: None,
                "shift": 3.0}

    def test_constant_denoiser_ends_on_its_estimate(self) -> None:
        """With a denoiser that always returns the same estimate, the result is that estimate, one call per
        sigma, each with sigma of shape [B]."""
        from anima_core.samplers import simple_sigmas

        target = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        calls: list[torch.Tensor] = []

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            assert sigma.shape == (x_t.shape[0],)
            calls.append(sigma)
            return target

        sampler = self.spec.build(self.make_options())
        out = sampler.sample(denoise, x, simple_sigmas(6), **self._runtime_kw(2))
        assert out.shape == x.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out, target)
        assert len(calls) == 6

    def test_is_deterministic_for_a_seeded_generator(self) -> None:
        """The same generator seed gives the same result (every random draw comes from it)."""
        from anima_core.samplers import simple_sigmas

        x = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return 0.5 * x_t  # depends on x so noise injected along the way matters

        sampler = self.spec.build(self.make_options())
        a = sampler.sample(denoise, x.clone(), simple_sigmas(5), **self._runtime_kw(3))
        b = sampler.sample(denoise, x.clone(), simple_sigmas(5), **self._runtime_kw(3))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class LossConformance(VariantConformance):
    """``compute(pred, target, t)`` as the loop calls it: fp32 velocity prediction and target, t of shape [B]."""

    kind = "loss"

    def test_per_element_loss_shape_sign_and_zero(self) -> None:
        """Per-element (unreduced), non-negative, differentiable, and zero where pred equals target."""
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
