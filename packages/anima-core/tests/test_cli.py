"""The ``anima`` CLI as a user runs it: real subprocesses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from anima_core import __version__

NO_HEAVY_IMPORTS = """
import sys
from anima_core.cli import main
sys.argv = ["anima", "--help"]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy", "safetensors") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code), file=sys.stderr)
"""


def test_help_does_not_import_torch_or_other_heavy_libraries():
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS], capture_output=True, text=True, timeout=60)
    assert "HEAVY= CODE=0" in result.stderr, result.stderr
    assert "plugins" in result.stdout and "config" in result.stdout


def test_console_script_is_installed_and_prints_the_version():
    script = Path(sys.executable).with_name("anima")
    assert script.exists() or shutil.which("anima"), "the anima console script is not installed"
    result = subprocess.run([str(script) if script.exists() else "anima", "version"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"anima-core {__version__}")


def test_usage_errors_exit_2(anima):
    assert anima("config", "validate").returncode == 2
    result = anima("no-such-command")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_no_arguments_shows_help(anima):
    result = anima()
    assert "Usage" in result.stdout + result.stderr


def test_config_schema_writes_a_file(anima, tmp_path):
    out = tmp_path / "sub" / "schema.json"
    result = anima("config", "schema", "-o", out)
    assert result.returncode == 0, result.stderr
    schema = json.loads(out.read_text())
    assert schema["title"] == "TrainingConfig"
    assert set(schema["properties"]) == {"model", "dataset", "adapter", "optimizer", "lr_scheduler", "loss",
                                         "timestep_sampler", "train", "sample", "output"}
    assert not [p for p in os.listdir(out.parent) if p.endswith(".tmp")]
