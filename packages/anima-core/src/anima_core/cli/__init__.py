"""The ``anima`` command line. Importing this module must stay cheap: no torch, no diffusers (commands import what
they need inside themselves), so ``anima --help`` answers at once even with a broken plugin installed."""

from __future__ import annotations

import os
import sys

import typer

from anima_core import __version__

HELP = """LoRA training for the Anima text-to-image model.

Examples:
  anima plugins list
  anima config validate config.yaml
  anima config show config.yaml --set optimizer.lr=5e-5
"""


def build_app() -> typer.Typer:
    """A fresh app with core's commands and every loaded plugin's commands."""
    from anima_core.cli import config_cmd, dataset_cmd, generate_cmd, plan_cmd, plugins_cmd, train_cmd
    from anima_core.plugin_host import get_host

    app = typer.Typer(name="anima", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False,
                      context_settings={"help_option_names": ["-h", "--help"]}, add_completion=False)

    @app.command()
    def version() -> None:
        """Print the version of anima-core and of each plugin distribution."""
        typer.echo(f"anima-core {__version__}")
        for record in get_host().records:
            if record.distribution != "anima-core":
                typer.echo(f"{record.distribution} {record.version} ({record.status})")

    app.command("train")(train_cmd.train)
    app.command("generate")(generate_cmd.generate)
    app.command("plan")(plan_cmd.plan)
    app.add_typer(plugins_cmd.app, name="plugins")
    app.add_typer(config_cmd.app, name="config")
    app.add_typer(dataset_cmd.app, name="dataset")
    get_host().add_commands(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit 0 ok, 2 bad input or config, 1 runtime failure, 130 on Ctrl-C."""
    from anima_core.config.loading import ConfigError
    from anima_core.errors import UserError
    from anima_core.plugin_host import PluginError

    try:
        app = build_app()
        app(args=argv, prog_name="anima")
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        sys.exit(2)
    except (UserError, PluginError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a runtime failure: one line unless asked for the traceback
        if os.environ.get("ANIMA_DEBUG"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (set ANIMA_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
