"""Pure functions of the training objective that are core options, not plugin kinds."""
