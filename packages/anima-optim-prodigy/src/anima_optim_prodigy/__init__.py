"""Prodigy and Prodigy + ScheduleFree optimizers for anima."""

__version__ = "0.1.0"
