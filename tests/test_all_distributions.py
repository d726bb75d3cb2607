"""Every distribution of the repo installed together, through real entry points."""

import json
from pathlib import Path

from anima_core.config.schema import json_schema
from anima_core.plugin_host import make_host

PACKAGES = sorted(p.name for p in (Path(__file__).parents[1] / "packages").iterdir()
                  if (p / "pyproject.toml").exists())


def test_plugins_list_shows_every_distribution_loaded(anima):
    result = anima("plugins", "list", "--json", env_extra={"ANIMA_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert sorted(e["distribution"] for e in entries) == PACKAGES
    assert all(e["status"] == "loaded" and e["error"] is None for e in entries), entries


def test_no_variant_name_clashes_and_the_schema_builds():
    host = make_host(strict=True)
    host.registry.check()
    schema = json_schema(host.registry)
    assert schema["properties"]["optimizer"]["discriminator"]["propertyName"] == "type"


def test_plugin_versions_allow_the_installed_core():
    import importlib.metadata as md

    from packaging.requirements import Requirement

    core = md.version("anima-core")
    for package in PACKAGES:
        if package == "anima-core":
            continue
        reqs = [Requirement(r) for r in md.requires(package) or []]
        core_req = next(r for r in reqs if r.name == "anima-core")
        assert core_req.specifier.contains(core), f"{package} requires {core_req}, core is {core}"
        assert core_req.specifier and any(s.operator == "<" for s in core_req.specifier), \
            f"{package} must bound anima-core from above"


def test_shipped_example_configs_validate(anima):
    for example in sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")):
        result = anima("config", "validate", example, env_extra={"ANIMA_STRICT_PLUGINS": "1"})
        assert result.returncode == 0, f"{example.name}: {result.stderr}"
