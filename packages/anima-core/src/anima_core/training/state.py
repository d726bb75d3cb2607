"""Full training state: a folder per save (``state/step_00000120/``) holding the adapter (fp32 safetensors), the
optimizer / scheduler / grad-scaler / timestep-sampler states and RNG states (``optim.pt``, read back with
``weights_only=True``, so no arbitrary unpickling), the data position and the resolved config (``state.json``).

A state is written into a hidden temp folder, every file fsynced, then renamed into place: a crash at any moment
leaves either the previous complete state or the new one, never a half-written one that ``--resume auto`` picks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from anima_core.errors import UserError

STATE_VERSION = 1
_PREFIX = "step_"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_snapshot() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(snapshot: dict[str, Any], torch_state: torch.Tensor | None, cuda_states: list | None) -> None:
    version, internal, gauss = snapshot["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = snapshot["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if torch_state is not None:
        torch.set_rng_state(torch_state)
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


def save_state(root: Path, *, step: int, write_adapter: Callable[[Path], None], optim: dict[str, Any],
               info: dict[str, Any], keep: int) -> Path:
    """Write ``root/step_<N>`` atomically and prune to the newest ``keep`` states (0 keeps all);
    ``write_adapter(path)`` writes the adapter's safetensors file (in full precision)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _check_finite(tmp, final, write_adapter, optim)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    torch.save({**optim, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"version": STATE_VERSION, **info, "rng": rng_snapshot()},
                                               default=str))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved twice (e.g. epoch end == step save): replace it
        old = root / f".{final.name}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for stale in complete_states(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _check_finite(tmp: Path, final: Path, write_adapter: Callable[[Path], None], optim: dict[str, Any]) -> None:
    """Write the adapter into ``tmp`` and refuse (NonFiniteError) a NaN/inf in it or in the optimizer-side states:
    a NaN state resumes into NaN steps forever, so it must never replace a good one."""
    from anima_core.training.finite import NonFiniteError, check_safetensors, describe, nonfinite_in

    write_adapter(tmp / "adapter.safetensors")
    check_safetensors(tmp / "adapter.safetensors", final / "adapter.safetensors")
    bad = nonfinite_in(optim)
    if bad:
        raise NonFiniteError(f"refusing to write the state {final}: {len(bad)} optimizer-side tensor(s) are not "
                             f"finite ({describe(bad)}); the earlier states are kept")


def complete_states(root: Path) -> list[Path]:
    """Complete state folders, oldest first (temp folders of interrupted writes are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").exists()
             and (p / "optim.pt").exists() and (p / "adapter.safetensors").exists()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(value: str | Path | None, root: Path) -> Path | None:
    """``--resume auto`` = the newest complete state under ``root`` (None if there is none); else a folder."""
    if value is None:
        return None
    if str(value) == "auto":
        states = complete_states(root)
        return states[-1] if states else None
    path = Path(value)
    if path.is_dir() and (path / "state.json").exists():
        return path
    raise UserError(f"--resume: {path} is not a training state folder (expected a state/step_NNNNNNNN folder with "
                    f"state.json, optim.pt and adapter.safetensors, or 'auto')")


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(info, adapter tensors, optimizer-side states) of a state folder."""
    from safetensors.torch import load_file

    try:
        info = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "adapter.safetensors"))
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"--resume: cannot read the state in {path}: {exc}") from None
    if info.get("version") != STATE_VERSION:
        raise UserError(f"--resume: {path} has state version {info.get('version')}, this anima writes "
                        f"{STATE_VERSION}")
    return info, tensors, optim
