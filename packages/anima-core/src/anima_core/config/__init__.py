"""The training configuration: core sections, the schema generated from installed plugins, loading and validation."""
