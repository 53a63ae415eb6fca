"""A test's application database: a SQLite file or a real PostgreSQL database, driven with the same statements."""

from __future__ import annotations

import sqlite3

import psycopg2


class Source:
    """Run statements on the source at ``url`` (``sqlite:///…`` or ``postgresql://…``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite:///")

    def execute(self, *statements: str, rows: list[tuple[object, ...]] | None = None) -> None:
        """Run the statements in one transaction (each once per row of ``rows`` when given; ``?`` placeholders)."""
        if self.is_sqlite:
            with sqlite3.connect(self.url[len("sqlite:///") :]) as conn:
                for statement in statements:
                    conn.executemany(statement, rows) if rows else conn.execute(statement)
            return
        conn = psycopg2.connect(self.url)
        try:
            with conn, conn.cursor() as cur:
                for statement in statements:
                    statement = statement.replace("?", "%s")
                    cur.executemany(statement, rows) if rows else cur.execute(statement)
        finally:
            conn.close()

    def query(self, statement: str) -> list[tuple[object, ...]]:
        """The rows of one query, as the driver returns them."""
        if self.is_sqlite:
            with sqlite3.connect(self.url[len("sqlite:///") :]) as conn:
                return conn.execute(statement).fetchall()
        conn = psycopg2.connect(self.url)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall()
        finally:
            conn.close()


def source_rows(url: str, statement: str) -> list[tuple[object, ...]]:
    """The rows of one query on the source at ``url``."""
    return Source(url).query(statement)
