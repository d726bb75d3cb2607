"""InfoNoise adaptive timestep sampling (arXiv 2602.18647) for anima."""

__version__ = "0.1.0"
