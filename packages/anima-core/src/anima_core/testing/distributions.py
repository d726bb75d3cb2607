"""Real (if tiny) installed distributions for tests: a ``.dist-info`` folder with an entry point and the plugin's
module source, in a folder the test puts on ``sys.path`` / ``PYTHONPATH``. ``importlib.metadata`` finds them
exactly as it finds a pip-installed plugin."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from anima_core.plugin_host import ENTRY_POINT_GROUP


def write_distribution(site: Path, distribution: str, version: str, module: str, source: str) -> Path:
    """Write distribution ``distribution`` whose ``anima_core.plugins`` entry point ``module`` names a module
    with ``source``. Returns ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{re.sub(r'[-.]+', '_', distribution)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{module} = {module}\n")
    (info / "RECORD").write_text("")
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    return site


def entry_points_of(*distributions: str) -> list:
    """The installed ``anima_core.plugins`` entry points of the named distributions only (e.g. core's built-ins
    alone, whatever else is installed)."""
    import importlib.metadata as md

    return [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP) if ep.dist and ep.dist.name in distributions]
