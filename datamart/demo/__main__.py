"""Command line: ``python -m datamart.demo [--scale F] [--seed N] [--source-url URL] [--bucket DIR] [...]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from datamart.demo.generator import (
    NotGeneratedError,
    SourceExistsError,
    advance_day,
    default_bucket,
    default_source_url,
    generate,
    source_exists,
)
from datamart.demo.source import DemoError
from datamart.settings import keep_files_private


def _parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m datamart.demo",
        description="Generate the demo application database and bucket files (day 0), or move them one day forward.",
    )
    parser.add_argument("--scale", type=float, default=None, help="size factor (1 = a few thousand rows; default 1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 42)")
    parser.add_argument(
        "--source-url",
        default=None,
        help="sqlite:///path or postgresql://user:pw@host:port/db "
        "(default: $SOURCES__APP_DB__CREDENTIALS, else sqlite:///data/demo/app.sqlite)",
    )
    parser.add_argument("--bucket", type=Path, default=None, help="bucket folder (default: data/bucket)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--if-missing", action="store_true", help="generate day 0 only if the source has no demo yet")
    mode.add_argument("--reset", action="store_true", help="drop the demo tables and files and regenerate day 0")
    mode.add_argument("--advance-day", action="store_true", help="apply the changes of the next demo day")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit code (2: the source's state does not allow the requested action)."""
    args = _parser().parse_args(argv)
    keep_files_private()  # the demo source holds (fake) personal data: owner only, as real data would be
    url = args.source_url or default_source_url()
    started = time.monotonic()
    try:
        bucket = args.bucket or default_bucket()
        if args.advance_day:
            if args.scale is not None or args.seed is not None:
                print("--scale and --seed are read back from demo_meta with --advance-day; drop them.", file=sys.stderr)
                return 2
            summary = advance_day(source_url=url, bucket=bucket)
        else:
            if args.if_missing and source_exists(url):
                print(f"demo source already exists ({_safe(url)}); nothing to do.")
                return 0
            summary = generate(
                source_url=url,
                bucket=bucket,
                scale=1.0 if args.scale is None else args.scale,
                seed=42 if args.seed is None else args.seed,
                reset=args.reset,
            )
    except (SourceExistsError, NotGeneratedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"source: {_safe(url)}\nbucket: {bucket}")
    print(summary.format())
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


def _safe(url: str) -> str:
    """The URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


if __name__ == "__main__":
    sys.exit(main())
