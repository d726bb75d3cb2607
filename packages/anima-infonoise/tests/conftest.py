import os
import subprocess
import sys
from pathlib import Path

import pytest

# infonoise_helpers beside the tests imports by name under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def anima():
    """The real CLI in a subprocess (``python -m anima_core`` = the ``anima`` console script)."""
    def run(*args):
        env = {k: v for k, v in os.environ.items() if k not in ("ANIMA_STRICT_PLUGINS", "ANIMA_DISABLE_PLUGINS")}
        return subprocess.run([sys.executable, "-m", "anima_core", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120)

    return run
