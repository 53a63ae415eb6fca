"""pgoutput, PostgreSQL's built-in logical decoding plugin: its binary messages decoded into relations and row
changes (protocol version 1, https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html).

Values arrive as text (the source's own output format) and are typed later by the warehouse's columns
(``datamart.ingest.replication``); an unchanged TOASTed value is :data:`UNCHANGED`, never None.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

#: pgoutput's marker of a TOASTed value an update left unchanged (it sends no value for it).
UNCHANGED = object()


@dataclass
class Relation:
    """A table as pgoutput describes it: its schema, name and columns (name, type oid) in tuple order."""

    schema: str
    name: str
    columns: list[tuple[str, int]]
    modifiers: list[int] = field(default_factory=list)  # each column's type modifier (numeric(12,2), varchar(n))


@dataclass
class Change:
    """One row change: ``kind`` is insert, update, delete or truncate; ``old`` the old key of an update that
    changed it (or of a delete); ``new`` the row (values as text, None, or UNCHANGED)."""

    kind: str
    relation: int
    new: list[Any] | None = None
    old: list[Any] | None = None
    relations: list[int] = field(default_factory=list)  # truncate: every relation truncated


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from("!" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("!" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        end = self.data.index(b"\0", self.pos)
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def tuple_data(self) -> list[Any]:
        values: list[Any] = []
        for _ in range(self.take("h")):
            kind = self.take("c")
            if kind == b"n":
                values.append(None)
            elif kind == b"u":
                values.append(UNCHANGED)
            elif kind == b"t":
                length = self.take("i")
                values.append(self.data[self.pos : self.pos + length].decode())
                self.pos += length
            else:
                raise ValueError(f"pgoutput: unexpected tuple data kind {kind!r}")
        return values


def decode(message: bytes, relations: dict[int, Relation]) -> tuple[str, Any]:
    """One pgoutput message: ``(type, payload)``; Relation messages are recorded in ``relations``.

    Types: ``begin``, ``commit`` (payload: the commit's end LSN), ``relation``, ``change`` (a :class:`Change`),
    ``other`` (Type, Origin, logical messages: nothing to apply)."""
    r = _Reader(message)
    tag = r.take("c")
    if tag == b"B":
        r.take("q")  # the commit's end LSN
        r.take("q")  # the commit's time
        return "begin", r.take("I")  # the transaction's id
    if tag == b"C":
        r.take("b")
        r.take("q")  # the commit's LSN
        return "commit", r.take("q")  # the end of the commit record: where the slot may be advanced to
    if tag == b"R":
        oid, schema, name = r.take("I"), r.string(), r.string()
        r.take("b")  # replica identity setting
        columns, modifiers = [], []
        for _ in range(r.take("h")):
            r.take("b")  # flags (1: part of the key)
            column = r.string()
            type_oid = r.take("I")
            modifiers.append(r.take("i"))
            columns.append((column, type_oid))
        relations[oid] = Relation(schema, name, columns, modifiers)
        return "relation", oid
    if tag == b"I":
        oid = r.take("I")
        r.take("c")  # 'N'
        return "change", Change("insert", oid, new=r.tuple_data())
    if tag == b"U":
        oid = r.take("I")
        old = None
        part = r.take("c")
        if part in (b"K", b"O"):  # the old key (changed key, or REPLICA IDENTITY FULL)
            old = r.tuple_data()
            part = r.take("c")
        return "change", Change("update", oid, new=r.tuple_data(), old=old)
    if tag == b"D":
        oid = r.take("I")
        r.take("c")  # 'K' or 'O'
        return "change", Change("delete", oid, old=r.tuple_data())
    if tag == b"T":
        count = r.take("i")
        r.take("b")  # options (cascade, restart identity)
        oids = [r.take("I") for _ in range(count)]
        return "change", Change("truncate", oids[0] if oids else 0, relations=oids)
    return "other", None  # Type ('Y'), Origin ('O'), Message ('M')
