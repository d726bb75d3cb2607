import os
import subprocess
import sys
from pathlib import Path

import pytest

# Helper modules beside the tests (fake_plugins) import by name under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))

from anima_core.plugin_host import make_host, set_host
from anima_core.testing.distributions import entry_points_of


def core_entry_points():
    return entry_points_of("anima-core")


@pytest.fixture
def builtin_host():
    """A host with anima-core's own entry point only (whatever else is installed), made the CLI's host."""
    host = make_host(entry_points=core_entry_points(), strict=True)
    set_host(host)
    yield host
    set_host(None)


@pytest.fixture
def host_with():
    """Build a host of core's entry point plus in-process plugins, made the CLI's host."""
    def make(*plugins, strict=False):
        host = make_host(entry_points=core_entry_points(), strict=strict, plugins=plugins)
        set_host(host)
        return host

    yield make
    set_host(None)


def run_anima(*args, env_extra=None, cwd=None, timeout=120):
    """Run the real CLI in a subprocess (``python -m anima_core`` = the ``anima`` console script)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ANIMA_STRICT_PLUGINS", "ANIMA_DISABLE_PLUGINS")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "anima_core", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def anima():
    return run_anima


@pytest.fixture
def write_yaml(tmp_path: Path):
    def write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
