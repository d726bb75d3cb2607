"""Check an installation: ``anima plugins list --json`` shows exactly the given distributions, all loaded, with
no variant-name clash, and the wheel carries the demo base (package data) in a form the real loaders read. Used by
the nox ``build`` session on the installed wheels."""

import json
import subprocess
import sys


# Runs in the installed environment: the packaged demo base must exist inside the installed anima_core (not a
# source checkout) and load through the same loaders users' files go through.
DEMO_BASE_CHECK = """
import anima_core
from anima_core.demo import base_model_paths
from anima_core.model.models import AnimaModels
base = base_model_paths()
assert 'site-packages' in str(base.transformer), base.transformer
models = AnimaModels.load(base.transformer, base.text_encoder, base.vae, base.qwen_tokenizer, base.t5_tokenizer)
print(base.transformer.parent)
"""


def demo_base_problems() -> list[str]:
    check = subprocess.run([sys.executable, "-c", DEMO_BASE_CHECK], capture_output=True, text=True)
    if check.returncode != 0:
        return [f"the demo base is missing from the wheel or does not load: {check.stderr.strip()[-600:]}"]
    return []


def main(expected: list[str]) -> int:
    out = subprocess.run(["anima", "plugins", "list", "--json"], capture_output=True, text=True, check=True)
    entries = json.loads(out.stdout)
    found = sorted(e["distribution"] for e in entries)
    problems = [f"{e['distribution']}: {e['status']} {e['error'] or ''}" for e in entries if e["status"] != "loaded"]
    if found != sorted(expected):
        problems.append(f"expected distributions {sorted(expected)}, found {found}")
    schema = subprocess.run(["anima", "config", "schema"], capture_output=True, text=True)
    if schema.returncode != 0:
        problems.append(f"anima config schema failed: {schema.stderr.strip()}")
    problems += demo_base_problems()
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {', '.join(found)} installed from wheels and loaded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
