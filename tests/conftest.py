import os
import subprocess
import sys

import pytest


@pytest.fixture
def anima():
    def run(*args, env_extra=None):
        env = {k: v for k, v in os.environ.items() if k != "ANIMA_DISABLE_PLUGINS"}
        env.update(env_extra or {})
        return subprocess.run([sys.executable, "-m", "anima_core", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120)

    return run
