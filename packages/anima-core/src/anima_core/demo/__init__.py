"""The demo world: a procedural shapes dataset with one held-out colour (:mod:`.shapes`), a deterministic scorer
(:mod:`.scoring`), sampling and grids (:mod:`.evaluate`) and a tiny *pretrained* Anima model set shipped as package
data (:func:`base_model_paths`), made by ``scripts/make_demo_base.py`` (see ``base/MADE.md``)."""

from anima_core.demo.base import DemoBase, base_model_paths

__all__ = ["DemoBase", "base_model_paths"]
