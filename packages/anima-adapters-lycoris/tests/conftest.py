import os
import subprocess
import sys
from pathlib import Path

import pytest

# Helper modules beside the tests (comfy_rules) import by name under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))

from anima_core.testing.datasets import write_shapes_dataset
from anima_core.testing.tiny import write_tiny_model_set


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return write_tiny_model_set(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4)


@pytest.fixture
def anima():
    """Run the real CLI in a subprocess (``python -m anima_core`` = the ``anima`` console script)."""
    def run(*args, timeout=300):
        env = {k: v for k, v in os.environ.items() if k not in ("ANIMA_STRICT_PLUGINS", "ANIMA_DISABLE_PLUGINS")}
        return subprocess.run([sys.executable, "-m", "anima_core", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=timeout)

    return run
