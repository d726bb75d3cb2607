"""The plugin host: real entry points, in-process plugins, failures, conflicts, attribution."""

import json

import pytest
from fake_plugins import (
    CommandPlugin,
    DuplicateAdamWPlugin,
    FakeOptimizerPlugin,
    RaisingRegisterPlugin,
    UnknownHookPlugin,
    WrongLiteralPlugin,
)

from anima_core import hookimpl
from anima_core.config.schema import json_schema
from anima_core.kinds import KINDS
from anima_core.plugin_host import PluginError, make_host
from anima_core.testing.distributions import entry_points_of, write_distribution

BROKEN_SOURCE = "raise RuntimeError('boom at import time')\n"

DUPLICATE_SOURCE = """
from typing import Literal
from anima_core import hookimpl
from anima_core.options import OptimizerOptions
from anima_core.specs import VariantSpec

class DupAdamW(OptimizerOptions):
    type: Literal["adamw"] = "adamw"

@hookimpl
def anima_register_optimizers(register):
    register(VariantSpec(name="adamw", options=DupAdamW, build=lambda o, g: None, description="clash"))
"""


def test_builtins_register_through_cores_own_entry_point(builtin_host):
    record = next(r for r in builtin_host.records if r.distribution == "anima-core")
    assert record.status == "loaded" and record.name == "anima_core"
    registry = builtin_host.registry
    assert set(record.provides) == set(KINDS)
    assert registry.names("optimizer") == ["adamw"]
    assert registry.get("loss", "huber").plugin is record


def test_in_process_plugin_appears_in_schema_enum_and_plugins_list(host_with):
    from typer.testing import CliRunner

    from anima_core.cli import build_app

    host = host_with(("fake_optimizer", FakeOptimizerPlugin()))
    schema = json_schema(host.registry)
    mapping = schema["properties"]["optimizer"]["discriminator"]["mapping"]
    assert set(mapping) == {"adamw", "fake_lion"}
    result = CliRunner().invoke(build_app(), ["plugins", "list", "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["distribution"]: e for e in json.loads(result.output)}
    assert entries["fake_optimizer"]["provides"] == {"optimizer": ["fake_lion"]}
    assert entries["fake_optimizer"]["status"] == "loaded"
    assert entries["anima-core"]["provides"]["optimizer"] == ["adamw"]


def test_broken_distribution_leaves_the_cli_working_and_is_listed_as_failed(tmp_path, anima):
    site = write_distribution(tmp_path / "site", "broken-plugin", "1.2.3", "broken_plugin", BROKEN_SOURCE)
    env = {"PYTHONPATH": str(site)}
    listed = anima("plugins", "list", "--json", env_extra=env)
    assert listed.returncode == 0, listed.stderr
    entries = {e["distribution"]: e for e in json.loads(listed.stdout)}
    broken = entries["broken-plugin"]
    assert broken["status"] == "failed" and broken["version"] == "1.2.3"
    assert "boom at import time" in broken["error"]
    assert entries["anima-core"]["status"] == "loaded"
    assert "skipped plugin broken-plugin 1.2.3" in listed.stderr
    assert "Traceback" not in listed.stderr
    assert anima("--help", env_extra=env).returncode == 0
    assert anima("config", "schema", env_extra=env).returncode == 0


def test_strict_mode_turns_a_broken_plugin_into_a_hard_failure(tmp_path, anima):
    site = write_distribution(tmp_path / "site", "broken-plugin", "1.2.3", "broken_plugin", BROKEN_SOURCE)
    result = anima("plugins", "list", env_extra={"PYTHONPATH": str(site), "ANIMA_STRICT_PLUGINS": "1"})
    assert result.returncode == 2
    assert "broken-plugin 1.2.3 failed to import" in result.stderr and "boom" in result.stderr
    assert "Traceback" not in result.stderr


def test_disabled_plugin_is_skipped_and_listed(tmp_path, anima):
    site = write_distribution(tmp_path / "site", "broken-plugin", "1.2.3", "broken_plugin", BROKEN_SOURCE)
    result = anima("plugins", "list", "--json",
                   env_extra={"PYTHONPATH": str(site), "ANIMA_DISABLE_PLUGINS": "broken_plugin",
                              "ANIMA_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr
    entries = {e["distribution"]: e for e in json.loads(result.stdout)}
    assert entries["broken-plugin"]["status"] == "disabled"


def test_duplicate_variant_name_from_two_distributions_is_refused_naming_both(tmp_path, anima, write_yaml):
    site = write_distribution(tmp_path / "site", "dup-optim", "9.9", "dup_optim", DUPLICATE_SOURCE)
    config = write_yaml("optimizer: {type: adamw}\n")
    result = anima("config", "validate", config, env_extra={"PYTHONPATH": str(site)})
    assert result.returncode == 2
    assert "optimizer 'adamw' is provided by both" in result.stderr
    assert "anima-core 0.1.0" in result.stderr and "dup-optim 9.9" in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_in_process_raises_in_strict_mode():
    with pytest.raises(PluginError, match="both anima-core .* and dup"):
        make_host(entry_points=entry_points_of("anima-core"), strict=True, plugins=[("dup", DuplicateAdamWPlugin())]).registry


def test_plugin_failing_to_register_is_skipped_and_others_still_work(host_with, capsys):
    host = host_with(("raiser", RaisingRegisterPlugin()), ("fake_optimizer", FakeOptimizerPlugin()))
    registry = host.registry
    raiser = next(r for r in host.records if r.name == "raiser")
    assert raiser.status == "failed" and "cannot register today" in raiser.error
    assert "fake_lion" in registry.names("optimizer")
    assert registry.names("loss") == ["huber", "mse"]
    assert "skipped plugin raiser" in capsys.readouterr().err


@pytest.mark.parametrize("plugin, message", [
    (WrongLiteralPlugin(), "options.type must be Literal['not_the_literal']"),
    (UnknownHookPlugin(), "unknown hook(s) anima_register_widgets"),
])
def test_malformed_plugins_are_reported(host_with, plugin, message):
    host = host_with(("bad", plugin))
    host.registry
    record = next(r for r in host.records if r.name == "bad")
    assert record.status == "failed"
    assert message in record.error


def test_plugins_add_cli_commands(host_with):
    from typer.testing import CliRunner

    from anima_core.cli import build_app

    host_with(("greeter", CommandPlugin()))
    result = CliRunner().invoke(build_app(), ["hello-plugin"])
    assert result.exit_code == 0 and "hello from a plugin command" in result.output


def test_every_hookspec_has_author_documentation():
    from anima_core import hookspecs
    from anima_core.kinds import REGISTER_HOOKS

    names = [n for n in dir(hookspecs) if n.startswith("anima_")]
    assert sorted(names) == sorted([*REGISTER_HOOKS.values(), "anima_register_commands"])
    for name in names:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc.split()) >= 15, f"{name} needs a docstring for plugin authors"


COUNTING_BROKEN_SOURCE = """
import os
with open(os.environ["ANIMA_TEST_IMPORT_LOG"], "a") as log:
    log.write("imported\\n")
raise RuntimeError("boom at import time")
"""


def test_unknown_variant_names_the_plugin_that_failed_to_load(tmp_path, anima, write_yaml, host_with):
    site = write_distribution(tmp_path / "site", "broken-plugin", "1.2.3", "broken_plugin", BROKEN_SOURCE)
    config = write_yaml("optimizer: {type: lion}\n")
    result = anima("config", "validate", config, env_extra={"PYTHONPATH": str(site)})
    assert result.returncode == 2
    assert "optimizer.type: unknown optimizer 'lion' (installed: " in result.stderr
    assert "broken-plugin 1.2.3 failed to import (RuntimeError: boom at import time)" in result.stderr
    # in-process: a plugin that fails while registering, named by the config error and by registry.get
    from anima_core.config.loading import ConfigError, validate_config

    host = host_with(("raiser", RaisingRegisterPlugin()))
    with pytest.raises(ConfigError, match=r"unknown loss 'fancy' .*raiser in-process failed to register its "
                                          r"variants \(RuntimeError: cannot register today\)"):
        validate_config({"loss": {"type": "fancy"}}, host.registry)
    with pytest.raises(PluginError, match="raiser in-process failed to register"):
        host.registry.get("loss", "fancy")
    clean = make_host(entry_points=entry_points_of("anima-core"), strict=True).registry
    with pytest.raises(PluginError) as caught:
        clean.get("loss", "fancy")
    assert "not loaded" not in str(caught.value)  # nothing failed: no hint


def test_a_strict_failure_is_reported_once_and_never_retried(tmp_path, anima, monkeypatch):
    from anima_core.plugin_host import get_host, set_host

    site = write_distribution(tmp_path / "site", "broken-plugin", "1.2.3", "broken_plugin",
                              COUNTING_BROKEN_SOURCE)
    log = tmp_path / "imports.log"
    env = {"PYTHONPATH": str(site), "ANIMA_STRICT_PLUGINS": "1", "ANIMA_TEST_IMPORT_LOG": str(log)}
    result = anima("train", tmp_path / "none.yaml", env_extra=env)
    assert result.returncode == 2 and result.stderr.count("boom at import time") == 1, result.stderr
    assert log.read_text().count("imported") == 1
    # in-process: the process-wide host keeps the failure instead of importing the plugin again per caller
    log.unlink()
    monkeypatch.syspath_prepend(str(site))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    set_host(None)
    try:
        with pytest.raises(PluginError, match="failed to import") as first:
            get_host()
        with pytest.raises(PluginError) as second:
            get_host()
        assert second.value is first.value and log.read_text().count("imported") == 1
    finally:
        set_host(None)
    # a registry that failed in strict mode is not rebuilt (the plugin's hook is not run again)
    calls = []

    class CountingRaiser:
        @hookimpl
        def anima_register_losses(self, register):
            calls.append(1)
            raise RuntimeError("cannot register today")

    host = make_host(entry_points=entry_points_of("anima-core"), strict=True, plugins=[("raiser", CountingRaiser())])
    for _ in range(3):
        with pytest.raises(PluginError, match="cannot register today"):
            host.registry
    assert calls == [1]


def test_the_conformance_kit_loads_the_plugins_once(monkeypatch):
    from anima_core.testing import conformance

    made = []

    def failing_make_host(**kwargs):
        made.append(kwargs)
        raise PluginError("plugin broken-plugin 1.2.3 failed to import: RuntimeError: boom")

    monkeypatch.setattr(conformance, "_registry_cache", [])
    monkeypatch.setattr(conformance, "make_host", failing_make_host)
    for _ in range(4):
        with pytest.raises(PluginError, match="broken-plugin"):
            conformance.installed_registry()
    assert made == [{"strict": True}]


def test_a_duplicate_name_blocks_only_the_configs_that_use_it(host_with):
    from typer.testing import CliRunner

    from anima_core.cli import build_app
    from anima_core.config.loading import ConfigError, validate_config

    host = host_with(("dup", DuplicateAdamWPlugin()), ("fake_optimizer", FakeOptimizerPlugin()))
    registry = host.registry
    assert validate_config({"optimizer": {"type": "fake_lion"}}, registry).config.optimizer.type == "fake_lion"
    for data in ({}, {"optimizer": {"type": "adamw", "lr": 1e-4}}):  # the default optimizer is adamw
        with pytest.raises(ConfigError, match=r"optimizer.type: optimizer 'adamw' is provided by both "
                                              r"anima-core 0.1.0 and dup in-process") as caught:
            validate_config(data, registry)
        assert len(caught.value.errors) == 1
    with pytest.raises(PluginError, match="provided by both"):
        registry.spec("optimizer", "adamw")
    listed = CliRunner().invoke(build_app(), ["plugins", "list", "--json"])
    assert listed.exit_code == 2
    entries = {e["distribution"]: e for e in json.loads(listed.stdout)}
    assert entries["anima-core"]["conflicts"] == entries["dup"]["conflicts"] == ["optimizer 'adamw'"]
    assert entries["fake_optimizer"]["conflicts"] == []
    table = CliRunner().invoke(build_app(), ["plugins", "list"])
    assert table.exit_code == 2 and "conflict" in table.stdout
    schema = CliRunner().invoke(build_app(), ["config", "schema"])
    assert schema.exit_code == 0 and "fake_lion" in schema.stdout


def test_a_duplicate_distribution_leaves_other_configs_working(tmp_path, anima, write_yaml):
    site = write_distribution(tmp_path / "site", "dup-loss", "9.9", "dup_loss", DUPLICATE_SOURCE.replace(
        "OptimizerOptions", "LossOptions").replace("anima_register_optimizers", "anima_register_losses").replace(
        '"adamw"', '"huber"').replace("lambda o, g: None", "lambda o: None"))
    env = {"PYTHONPATH": str(site)}
    ok = anima("config", "validate", write_yaml("loss: {type: mse}\n"), env_extra=env)
    assert ok.returncode == 0, ok.stderr
    used = anima("config", "validate", write_yaml("loss: {type: huber}\n", "huber.yaml"), env_extra=env)
    assert used.returncode == 2 and "loss 'huber' is provided by both anima-core 0.1.0 and dup-loss 9.9" in used.stderr
    listed = anima("plugins", "list", env_extra=env)
    assert listed.returncode == 2 and "conflict" in listed.stdout
