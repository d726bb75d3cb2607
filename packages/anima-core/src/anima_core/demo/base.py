"""Where the packaged demo base lives, and how the demo samples from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anima_core.errors import UserError

BASE_DIR = Path(__file__).parent / "base"
# Official-format file names, shrunk as the tiny test set's are (anima_core.testing.tiny).
FILE_NAMES = {"transformer": "anima-demo.safetensors", "text_encoder": "qwen_3_demo.safetensors",
              "vae": "qwen_image_vae_demo.safetensors", "qwen_tokenizer": "qwen_tokenizer",
              "t5_tokenizer": "t5_tokenizer"}
# Sampling used for every demo figure (base check, before/after grid, test): Anima's inference defaults (er_sde,
# CFG 4, shift 3) at 64 px, with fewer steps since the latent is only 8×8.
SAMPLE_SETTINGS = {"width": 64, "height": 64, "steps": 20, "cfg": 4.0, "shift": 3.0, "sampler": "er_sde"}


@dataclass(frozen=True)
class DemoBase:
    """Paths of the demo model set; attribute names as :class:`anima_core.testing.tiny.TinyModelSet`."""

    transformer: Path
    text_encoder: Path
    vae: Path
    qwen_tokenizer: Path
    t5_tokenizer: Path

    def as_model_section(self) -> dict[str, str]:
        """The ``model`` section entries of a training config."""
        return {key: str(getattr(self, key)) for key in FILE_NAMES}


def base_model_paths(directory: Path | None = None) -> DemoBase:
    """The packaged demo base (or the same file names in ``directory``); an error names what is missing."""
    folder = BASE_DIR if directory is None else Path(directory)
    paths = DemoBase(**{key: folder / name for key, name in FILE_NAMES.items()})
    missing = [str(getattr(paths, key)) for key in FILE_NAMES if not getattr(paths, key).exists()]
    if missing:
        raise UserError(f"the demo base model set is incomplete, missing: {', '.join(missing)} (reinstall "
                        f"anima-core, or run scripts/make_demo_base.py)")
    return paths
