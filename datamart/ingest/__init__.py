"""Declared dlt pipelines: declarations, sources, personal-data treatments and the runner."""
