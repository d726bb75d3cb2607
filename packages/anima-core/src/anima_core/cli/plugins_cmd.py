"""``anima plugins ...``"""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Installed plugin distributions and the variants they provide.", no_args_is_help=True)


@app.command("list")
def list_plugins(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List every plugin distribution: version, status, error and provided variants per kind.

    Exit 2 when two distributions provide the same variant name (both are marked; configs using that name are
    refused, others still work)."""
    from anima_core.plugin_host import get_host

    host = get_host()
    registry = host.registry  # collects registrations (and marks plugins that fail to register)
    records = sorted(host.records, key=lambda r: r.distribution)
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in records], indent=2))
        for conflict in registry.conflicts:
            typer.echo(f"conflict: {conflict}", err=True)
        if registry.conflicts:
            raise typer.Exit(2)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="anima plugins")
    for col in ("distribution", "version", "status", "provides"):
        table.add_column(col)
    for r in records:
        provides = "\n".join(f"{kind}: {', '.join(sorted(names))}" for kind, names in sorted(r.provides.items()))
        status = r.status if not r.error else f"{r.status}: {r.error}"
        if r.conflicts:
            status += f" (conflict: {', '.join(sorted(r.conflicts))})"
        table.add_row(r.distribution, r.version, status, provides)
    console = Console()
    console.print(table)
    for conflict in registry.conflicts:
        console.print(f"[red]conflict:[/red] {conflict}")
    if registry.conflicts:
        raise typer.Exit(2)
