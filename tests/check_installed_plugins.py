"""Check an installation: ``anima plugins list --json`` shows exactly the given distributions, all loaded, with
no variant-name clash. Used by the nox ``build`` session on the installed wheels."""

import json
import subprocess
import sys


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
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {', '.join(found)} installed from wheels and loaded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
