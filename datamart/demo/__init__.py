"""The demo source: a deterministic volunteering platform database and bucket files (docs/demo-source.md)."""

from datamart.demo.generator import (
    DaySummary,
    NotGeneratedError,
    SourceExistsError,
    TableCounts,
    advance_day,
    day_date,
    default_bucket,
    default_source_url,
    generate,
    source_exists,
)
from datamart.demo.source import DemoError

__all__ = [
    "DaySummary",
    "DemoError",
    "NotGeneratedError",
    "SourceExistsError",
    "TableCounts",
    "advance_day",
    "day_date",
    "default_bucket",
    "default_source_url",
    "generate",
    "source_exists",
]
