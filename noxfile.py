"""Test sessions, each in its own pip-based virtualenv (uv would not see this machine's local CPU torch build).

  nox                       every default session below
  nox -s core               anima-core alone, with no plugin importable
  nox -s plugin             core + each plugin distribution alone
  nox -s all_plugins        every distribution together: real entry points, no clashes, schema, CLI
  nox -s build              build every wheel, install the wheels (not editables) and check the entry points
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
PLUGINS = [p for p in PACKAGES if p != "anima-core"]
# Installed in the same pip call as the packages so their looser torch range resolves to this build.
TORCH = os.environ.get("ANIMA_TORCH_SPEC", "torch==2.13.0")
STRICT = {"ANIMA_STRICT_PLUGINS": "1"}

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["core", "plugin", "all_plugins", "build"]


def _module(package: str) -> str:
    return package.replace("-", "_")


def _install_editable(session: nox.Session, *packages: str) -> None:
    session.install(TORCH, *[f"-e{ROOT / 'packages' / p}[test]" for p in packages])


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run("pytest", *paths, *session.posargs, env=STRICT)


@nox.session
def core(session: nox.Session) -> None:
    """anima-core alone: its built-ins and plugin host with no plugin importable."""
    _install_editable(session, "anima-core")
    session.run("python", "-c", "import importlib.util as u, sys; "
                f"found = [m for m in {[_module(p) for p in PLUGINS]!r} if u.find_spec(m)]; "
                "sys.exit(f'plugins importable in the core session: {found}' if found else 0)")
    _pytest(session, "packages/anima-core/tests")


@nox.session
@nox.parametrize("package", PLUGINS)
def plugin(session: nox.Session, package: str) -> None:
    """anima-core plus exactly one plugin distribution."""
    _install_editable(session, "anima-core", package)
    _pytest(session, f"packages/{package}/tests")


@nox.session
def all_plugins(session: nox.Session) -> None:
    """Every distribution installed together."""
    _install_editable(session, *PACKAGES)
    _pytest(session, "tests")


@nox.session
def build(session: nox.Session) -> None:
    """Build every wheel, install the wheels in a fresh venv and check the installed entry points."""
    dist = Path(session.create_tmp()) / "dist"
    session.run("python", "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                *[str(ROOT / "packages" / p) for p in PACKAGES])
    wheels = sorted(str(w) for w in dist.glob("*.whl"))
    if len(wheels) != len(PACKAGES):
        session.error(f"expected {len(PACKAGES)} wheels, built {wheels}")
    session.install(TORCH, *wheels)
    session.run("python", str(ROOT / "tests" / "check_installed_plugins.py"), *PACKAGES, env=STRICT)
