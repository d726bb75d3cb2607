"""The training runtime: a ``TrainingContext`` run through the phases bootstrap → models → dataset → optimizer →
resume → loop → finalize (``anima_core.training.phases``). Entry point: :func:`anima_core.training.api.train`."""
