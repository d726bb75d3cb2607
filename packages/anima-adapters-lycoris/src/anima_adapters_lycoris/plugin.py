"""The module anima-core loads through this distribution's `anima_core.plugins` entry point.

No variants yet: hook implementations (`@anima_core.hookimpl`) are added here as they are built.
"""
