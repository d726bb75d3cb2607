"""``anima config ...``"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="The config schema for the installed plugins; validate and show configs.",
                  no_args_is_help=True)

SET_HELP = "Override a value: key.path=value (repeatable; the value is parsed as YAML)."


@app.command("schema")
def schema(output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to this file.")) -> None:
    """Print the JSON Schema of the config for the installed plugins."""
    from anima_core import atomic
    from anima_core.config.schema import json_schema
    from anima_core.plugin_host import get_host

    registry = get_host().registry
    for conflict in registry.conflicts:  # configs that use the name are refused; the schema shows the first one's
        typer.echo(f"warning: {conflict}", err=True)
    text = json.dumps(json_schema(registry), indent=2, sort_keys=True) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic.write_text(output, text)
        typer.echo(f"wrote {output}", err=True)


def _load(config: Path, overrides: list[str]):
    from anima_core.config.loading import load_config
    from anima_core.plugin_host import get_host

    loaded = load_config(config, overrides, get_host().registry)
    for issue in loaded.warnings:
        typer.echo(f"{config}: warning: {issue}", err=True)
    return loaded


@app.command("validate")
def validate(config: Path = typer.Argument(..., help="YAML config file."),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Check a config: every error is reported at once, each with its dotted path (exit 2 if any)."""
    _load(config, set_)
    typer.echo(f"{config}: ok")


@app.command("show")
def show(config: Path = typer.Argument(..., help="YAML config file."),
         set_: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    import yaml

    loaded = _load(config, set_)
    typer.echo(yaml.safe_dump(loaded.config.model_dump(mode="json"), sort_keys=False), nl=False)
