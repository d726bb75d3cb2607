"""The documented plugin contract equals what the runtime does (issue 17, item 1).

Recording variants of every kind wrap core's built-ins; a real ``train()`` run (with a state save, a resume, a
preview and weight decay, so every adapter and sampler method is called) records each call's shape, and so does
the conformance kit run against the same variants. Every runtime call must bind to the protocol's signature, and the
kit must make every call the runtime makes, argument for argument, so neither can drift from the other.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors import safe_open
from torch import nn

from anima_core import hookimpl, protocols
from anima_core.builtins.adapters import LoRAOptions
from anima_core.builtins.inference import EULER, EulerOptions
from anima_core.builtins.losses import MSE, MSEOptions
from anima_core.builtins.optimizers import ADAMW, AdamWOptions
from anima_core.builtins.schedulers import CONSTANT, ConstantOptions
from anima_core.builtins.timesteps import UNIFORM, UniformOptions
from anima_core.lora import LoRAAdapter
from anima_core.options import VariantOptions
from anima_core.plugin_host import make_host
from anima_core.specs import VariantSpec
from anima_core.testing import (
    AdapterConformance,
    InferenceSamplerConformance,
    LossConformance,
    LRSchedulerConformance,
    OptimizerConformance,
    TimestepSamplerConformance,
)
from anima_core.testing.datasets import write_shapes_dataset
from anima_core.testing.distributions import entry_points_of
from anima_core.testing.tiny import write_tiny_model_set
from anima_core.testing.training import tiny_train_config
from anima_core.training.api import train

pytestmark = pytest.mark.slow

# Which protocol documents each recorded method (``build`` calls are checked against the kit only).
PROTOCOLS = {
    "adapter": (protocols.AdapterProtocol, protocols.AdapterHooks, protocols.MergeableAdapter),
    "timestep_sampler": (protocols.TimestepSamplerProtocol, protocols.TimestepSamplerHooks),
    "loss": (protocols.LossProtocol,),
    "inference_sampler": (protocols.InferenceSamplerProtocol,),
}
RECORDED = {
    "adapter": {"inject", "get_param_groups", "save", "load", "on_step_begin", "regularization_loss",
                "excludes_weight_decay", "merge", "unmerge", "set_multiplier"},
    "timestep_sampler": {"sample", "record", "maybe_refresh", "status", "state_dict", "load_state_dict"},
    "loss": {"compute"},
    "inference_sampler": {"sample"},
}

CALLS: list[tuple[str, str, tuple, dict]] = []  # (kind, method, args, kwargs) while recording


def _category(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    for cls, name in ((nn.Module, "module"), (Path, "path"), (str, "str"), (torch.dtype, "dtype"),
                      (torch.Tensor, "tensor"), (torch.Generator, "generator"), (protocols.StepContext, "step_ctx"),
                      (int, "int"), (float, "float"), (dict, "mapping"), (list, "list"),
                      (torch.optim.Optimizer, "optimizer"), (VariantOptions, "options")):
        if isinstance(value, cls):
            return name
    return "none" if value is None else "callable" if callable(value) else type(value).__name__


def shape(call: tuple[str, str, tuple, dict]) -> tuple:
    kind, method, args, kwargs = call
    return (kind, method, tuple(_category(a) for a in args),
            tuple(sorted((k, _category(v)) for k, v in kwargs.items())))


class Recording:
    """Delegates everything to ``inner``; calls of the kind's protocol methods are logged."""

    def __init__(self, kind: str, inner: Any) -> None:
        self.__dict__.update(_kind=kind, _inner=inner)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in RECORDED[self._kind] or not callable(value):
            return value

        def recorded(*args, **kwargs):
            CALLS.append((self._kind, name, args, kwargs))
            return value(*args, **kwargs)

        return recorded


def recording_build(kind: str, build, wrap: bool = True):
    def build_and_record(*args, **kwargs):
        CALLS.append((kind, "build", args, kwargs))
        made = build(*args, **kwargs)
        return Recording(kind, made) if wrap else made

    return build_and_record


class HookedLoRA(LoRAAdapter):
    """Core's LoRA plus every optional adapter hook, so the runtime's calls of them are recorded too."""

    def on_step_begin(self, ctx) -> None:
        pass

    def regularization_loss(self, ctx):
        return None

    def excludes_weight_decay(self, name: str) -> bool:
        return False


class RecLoRAOptions(LoRAOptions):
    type: Literal["rec_lora"] = "rec_lora"


class RecAdamWOptions(AdamWOptions):
    type: Literal["rec_adamw"] = "rec_adamw"


class RecConstantOptions(ConstantOptions):
    type: Literal["rec_constant"] = "rec_constant"


class RecUniformOptions(UniformOptions):
    type: Literal["rec_uniform"] = "rec_uniform"


class RecMSEOptions(MSEOptions):
    type: Literal["rec_mse"] = "rec_mse"


class RecEulerOptions(EulerOptions):
    type: Literal["rec_euler"] = "rec_euler"


class RecordingPlugin:
    @hookimpl
    def anima_register_adapters(self, register):
        register(VariantSpec(name="rec_lora", options=RecLoRAOptions, description="recording LoRA",
                             build=recording_build("adapter", HookedLoRA)))

    @hookimpl
    def anima_register_optimizers(self, register):
        register(VariantSpec(name="rec_adamw", options=RecAdamWOptions, description="recording AdamW",
                             build=recording_build("optimizer", ADAMW.build, wrap=False)))

    @hookimpl
    def anima_register_lr_schedulers(self, register):
        register(VariantSpec(name="rec_constant", options=RecConstantOptions, description="recording constant",
                             build=recording_build("lr_scheduler", CONSTANT.build, wrap=False)))

    @hookimpl
    def anima_register_timestep_samplers(self, register):
        register(VariantSpec(name="rec_uniform", options=RecUniformOptions, description="recording uniform",
                             build=recording_build("timestep_sampler", UNIFORM.build)))

    @hookimpl
    def anima_register_losses(self, register):
        register(VariantSpec(name="rec_mse", options=RecMSEOptions, description="recording MSE",
                             build=recording_build("loss", MSE.build)))

    @hookimpl
    def anima_register_inference_samplers(self, register):
        register(VariantSpec(name="rec_euler", options=RecEulerOptions, description="recording Euler",
                             build=recording_build("inference_sampler", EULER.build)))


@pytest.fixture(scope="module")
def registry():
    return make_host(entry_points=entry_points_of("anima-core"), strict=True,
                     plugins=[("recording", RecordingPlugin())]).registry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4)


def _runtime_calls(tiny, images, out: Path, registry) -> list:
    sections = dict(adapter={"type": "rec_lora"}, optimizer={"type": "rec_adamw", "weight_decay": 0.01},
                    lr_scheduler={"type": "rec_constant", "warmup_steps": 1}, loss={"type": "rec_mse"},
                    timestep_sampler={"type": "rec_uniform"},
                    sample={"sampler": {"type": "rec_euler"}, "prompts": ["a red square"], "every_n_steps": 2,
                            "steps": 2, "cfg": 1.0},
                    output={"save_state_every_n_steps": 2, "save_every_n_steps": 2})
    CALLS.clear()
    first = train(tiny_train_config(tiny, images, out, train={"max_steps": 2, "batch_size": 2}, **sections),
                  registry=registry)
    train(tiny_train_config(tiny, images, out, train={"max_steps": 3, "batch_size": 2}, **sections),
          resume=first.state, registry=registry)
    calls = list(CALLS)
    CALLS.clear()
    return calls


class _InProcess:
    _registry: Any = None

    def registry(self):
        return self._registry


class KitAdapter(_InProcess, AdapterConformance):
    name = "rec_lora"
    options = {"targets": [".*"], "rank": 2}


class KitOptimizer(_InProcess, OptimizerConformance):
    name = "rec_adamw"


class KitScheduler(_InProcess, LRSchedulerConformance):
    name = "rec_constant"


class KitTimesteps(_InProcess, TimestepSamplerConformance):
    name = "rec_uniform"


class KitLoss(_InProcess, LossConformance):
    name = "rec_mse"


class KitInference(_InProcess, InferenceSamplerConformance):
    name = "rec_euler"


def _kit_calls(registry, tmp_path: Path) -> list:
    CALLS.clear()
    for cls in (KitAdapter, KitOptimizer, KitScheduler, KitTimesteps, KitLoss, KitInference):
        cls._registry = registry
        for name in sorted(n for n in dir(cls) if n.startswith("test_")):
            method = getattr(cls(), name)
            folder = tmp_path / cls.__name__ / name
            folder.mkdir(parents=True)
            try:
                method(folder) if "tmp_path" in inspect.signature(method).parameters else method()
            except pytest.skip.Exception:
                pass
    calls = list(CALLS)
    CALLS.clear()
    return calls


def test_runtime_calls_match_the_protocols_and_the_conformance_kit(tiny, images, tmp_path, registry):
    runtime = _runtime_calls(tiny, images, tmp_path / "run", registry)
    methods = {(kind, method) for kind, method, _, _ in runtime}
    # every adapter and timestep-sampler method the runtime uses was exercised (merge & co. it never calls)
    assert methods >= {("adapter", m) for m in ("inject", "get_param_groups", "save", "load", "on_step_begin",
                                                "regularization_loss", "excludes_weight_decay")}
    assert methods >= {("timestep_sampler", m) for m in ("sample", "state_dict", "load_state_dict")}
    assert ("inference_sampler", "sample") in methods and ("loss", "compute") in methods
    for kind, method, args, kwargs in runtime:
        if method == "build":
            continue
        proto = next(p for p in PROTOCOLS[kind] if hasattr(p, method))
        inspect.signature(getattr(proto, method)).bind(None, *args, **kwargs)  # TypeError = doc ≠ runtime
    saves = {shape(c) for c in runtime if c[:2] == ("adapter", "save")}
    assert saves == {("adapter", "save", ("path", "mapping"), (("dtype", "dtype"),)),  # LoRA file
                     ("adapter", "save", ("path", "mapping"), ())}  # state
    kit = {shape(c) for c in _kit_calls(registry, tmp_path / "kit")}
    missing = sorted({shape(c) for c in runtime} - kit)
    assert not missing, f"the runtime makes calls the conformance kit never makes: {missing}"


class OldSaveLoRA(LoRAAdapter):
    """An adapter written to the signature documented before: ``save(path, metadata=None)``, no dtype."""

    def save(self, path, metadata=None):  # type: ignore[override]
        super().save(path, metadata)


class OldOptions(LoRAOptions):
    type: Literal["old_save_lora"] = "old_save_lora"


class OldSavePlugin:
    @hookimpl
    def anima_register_adapters(self, register):
        register(VariantSpec(name="old_save_lora", options=OldOptions, build=OldSaveLoRA,
                             description="LoRA with the old save signature"))


def test_adapter_with_the_old_save_signature_trains_saves_and_resumes(tiny, images, tmp_path, capsys):
    host = make_host(entry_points=entry_points_of("anima-core"), strict=True, plugins=[("old", OldSavePlugin())])
    cfg = dict(adapter={"type": "old_save_lora", "rank": 2}, output={"save_state_every_n_steps": 1,
                                                                    "save_every_n_steps": 1})
    result = train(tiny_train_config(tiny, images, tmp_path / "out", train={"max_steps": 2}, **cfg),
                   registry=host.registry)
    assert result.steps == 2 and result.lora.exists() and result.state is not None
    with safe_open(str(result.lora), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert f.metadata()["ss_steps"] == "2"  # core's metadata still reaches the file
    assert dtypes == {torch.float32}  # the adapter's own precision: core does not rewrite a plugin's file
    err = capsys.readouterr().err
    assert err.count("takes no dtype argument") == 1, err  # three LoRA saves, one warning
    assert "output.save_dtype (BF16)" in err
    resumed = train(tiny_train_config(tiny, images, tmp_path / "out", train={"max_steps": 3}, **cfg),
                    resume=result.state, registry=host.registry)
    assert resumed.steps == 3


STEP_LRS: list[float] = []


class ProbeOptions(AdamWOptions):
    type: Literal["lr_probe"] = "lr_probe"


def _probe_build(options, param_groups):
    class ProbeSGD(torch.optim.SGD):
        def step(self, closure=None):
            STEP_LRS.append(self.param_groups[0]["lr"])
            return super().step(closure)

    return ProbeSGD(param_groups, lr=options.lr)


class ProbePlugin:
    @hookimpl
    def anima_register_optimizers(self, register):
        register(VariantSpec(name="lr_probe", options=ProbeOptions, build=_probe_build, description="lr probe"))


def test_the_scheduler_applies_warmup_and_step_1_runs_at_lr_0(tiny, images, tmp_path):
    """What the lr_scheduler hookspec says: core does not warm up; core's schedulers give step k the factor
    (k − 1) / warmup_steps, so the first optimizer step runs at lr 0; the monitor logs the lr each step ran at."""
    import json

    host = make_host(entry_points=entry_points_of("anima-core"), strict=True, plugins=[("probe", ProbePlugin())])
    STEP_LRS.clear()
    result = train(tiny_train_config(tiny, images, tmp_path / "warm", optimizer={"type": "lr_probe", "lr": 0.01},
                                     lr_scheduler={"type": "constant", "warmup_steps": 2}, train={"max_steps": 4}),
                   registry=host.registry)
    assert STEP_LRS == pytest.approx([0.0, 0.005, 0.01, 0.01])
    logged = json.loads((result.output_dir / "monitor_state.json").read_text())["lr_history"]
    assert [e["lr"] for e in logged] == pytest.approx(STEP_LRS)
    STEP_LRS.clear()
    train(tiny_train_config(tiny, images, tmp_path / "cold", optimizer={"type": "lr_probe", "lr": 0.01},
                            lr_scheduler={"type": "constant", "warmup_steps": 0}, train={"max_steps": 2}),
          registry=host.registry)
    assert STEP_LRS == pytest.approx([0.01, 0.01])  # without warm-up, step 1 runs at the full lr
