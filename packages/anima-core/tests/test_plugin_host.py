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
