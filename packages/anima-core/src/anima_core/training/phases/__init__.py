"""The phases of a run, in order; each is ``run(ctx) -> None`` and fills its own group of the context."""

from anima_core.training.phases import bootstrap, dataset, finalize, loop, models, optimizer, resume

ORDER = (bootstrap, models, dataset, optimizer, resume, loop, finalize)
