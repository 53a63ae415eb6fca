"""Deterministic generator of the demo application database and bucket files (see docs/demo-source.md).

Every random draw comes from ``numpy.random.default_rng([seed, day, stream, part])``: the same seed, scale and day
give the same rows on SQLite and PostgreSQL. No wall clock is read; the demo world has its own calendar.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datamart.demo import reference as ref
from datamart.demo.source import META_TABLE, PROJECT_ROOT, TABLES, DemoError, Source, open_source

HISTORY_START = dt.date(2025, 10, 1)
HISTORY_DAYS = 92
DAY = 86_400
CHUNK_ROWS = 500_000
REPORT_HISTORY_DAYS = 7
PARTNER_EVERY_DAYS = 7

DEFAULT_SOURCE_FILE = Path("data") / "demo" / "app.sqlite"
DEFAULT_BUCKET_DIR = Path("data") / "bucket"
PARTNERS_FILE = Path("referentials") / "partners.csv"
REPORTS_DIR = Path("exports") / "partner_reports"

#: Rows at scale 1 (day 0), and the smallest sizes whatever the scale.
BASE_SIZES = {"organizations": 200, "missions": 1_000, "volunteers": 2_000, "applications": 4_000}
MIN_SIZES = {"organizations": 5, "missions": 20, "volunteers": 20, "applications": 40}
EVENTS_PER_SCALE = 20_000
MIN_EVENTS = 500

#: Daily changes at scale 1 (expected counts; at least one of each whatever the scale).
DAILY_NEW = {"organizations": 2.0, "missions": 11.0, "volunteers": 22.0, "applications": 44.0}
DAILY_ERASED_VOLUNTEERS = 2.0
DAILY_WITHDRAWN_APPLICATIONS = 5.0
DAILY_SOFT_DELETED = {"organizations": 1.0, "missions": 3.0}
MISSION_UPDATE_SHARE = 0.02
APPLICATION_UPDATE_SHARE = 0.03

# Random streams (the third seed word), so that each step draws independently of the others.
S_ORG, S_MIS, S_VOL, S_APP, S_EVT = 1, 2, 3, 4, 5
S_ORG_SOFT, S_MIS_CHANGE, S_ERASE, S_WITHDRAW, S_APP_CHANGE = 11, 12, 13, 14, 15

DRAFT, PUBLISHED, CLOSED = 0, 1, 2
PENDING, ACCEPTED, REFUSED, CANCELLED = 0, 1, 2, 3
_MISSION_STATUS_SQL = "CASE status WHEN 'draft' THEN 0 WHEN 'published' THEN 1 ELSE 2 END"
_APPLICATION_STATUS_SQL = "CASE status WHEN 'pending' THEN 0 WHEN 'accepted' THEN 1 WHEN 'refused' THEN 2 ELSE 3 END"


class SourceExistsError(DemoError):
    """The source already holds the demo: the caller must say what to do with it."""


class NotGeneratedError(DemoError):
    """The source was never generated, so there is no day to advance."""


@dataclass
class TableCounts:
    """What one day did to one table."""

    inserted: int = 0
    updated: int = 0
    soft_deleted: int = 0
    hard_deleted: int = 0


@dataclass
class DaySummary:
    """What a generation or an advanced day did: the demo day, its date, per table counts and files written."""

    day: int
    date: dt.date
    tables: dict[str, TableCounts] = field(default_factory=lambda: {name: TableCounts() for name in TABLES})
    files: list[Path] = field(default_factory=list)

    def format(self) -> str:
        """A short human-readable report."""
        lines = [f"demo day {self.day} ({self.date.isoformat()})"]
        lines.append(f"  {'table':<14} {'inserted':>10} {'updated':>9} {'soft-deleted':>13} {'hard-deleted':>13}")
        for name, c in self.tables.items():
            lines.append(f"  {name:<14} {c.inserted:>10,} {c.updated:>9,} {c.soft_deleted:>13,} {c.hard_deleted:>13,}")
        lines.append(f"  files written: {len(self.files)}")
        lines.extend(f"    {path}" for path in self.files)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- locations


def default_source_url() -> str:
    """``SOURCES__APP_DB__CREDENTIALS`` when set (dlt's convention), else the SQLite file ``data/demo/app.sqlite``."""
    from_env = os.environ.get("SOURCES__APP_DB__CREDENTIALS", "").strip()
    if from_env:
        return from_env
    return f"sqlite:///{PROJECT_ROOT / DEFAULT_SOURCE_FILE}"


def default_bucket() -> Path:
    """``SOURCES__BUCKET__BUCKET_URL`` when set to a local folder, else ``data/bucket`` under the project root."""
    url = os.environ.get("SOURCES__BUCKET__BUCKET_URL", "").strip()
    if not url:
        return PROJECT_ROOT / DEFAULT_BUCKET_DIR
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise DemoError(
            f"SOURCES__BUCKET__BUCKET_URL={url!r} is not a local folder; the demo writes files locally: "
            "pass --bucket DIR (then copy the files to the bucket)."
        )
    path = Path(url)
    return path if path.is_absolute() else PROJECT_ROOT / path


def day_date(day: int) -> dt.date:
    """Date of a demo day: day 0 is the last history day (2025-12-31), day 1 is 2026-01-01."""
    return HISTORY_START + dt.timedelta(days=HISTORY_DAYS - 1 + day)


def _epoch(date: dt.date) -> int:
    """Seconds since 1970-01-01 at midnight UTC of a date."""
    return (date - dt.date(1970, 1, 1)).days * DAY


HISTORY_START_S = _epoch(HISTORY_START)
HISTORY_END_S = HISTORY_START_S + HISTORY_DAYS * DAY - 1


# --------------------------------------------------------------------------------------------------- helpers


def _rng(seed: int, day: int, stream: int, part: int = 0) -> np.random.Generator:
    """The random generator of one step of one day."""
    return np.random.default_rng([seed, day, stream, part])


def _at_least_one(rng: np.random.Generator, expected: float) -> int:
    """A Poisson count around ``expected``, at least 1."""
    return max(1, int(rng.poisson(expected)))


def _timestamps(seconds: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """Seconds since the epoch as a timestamp[s] array (``null`` marks NULLs)."""
    return pa.array(seconds.astype(np.int64).astype("datetime64[s]"), mask=null)


def _dates(days: np.ndarray) -> pa.Array:
    """Days since the epoch as a date32 array."""
    return pa.array(days.astype(np.int64).astype("datetime64[D]"))


def _strings(values: np.ndarray) -> pa.Array:
    """An object array of str as a string array."""
    return pa.array(values, type=pa.string())


def _week_factor(dates_s: np.ndarray) -> np.ndarray:
    """Less activity on Saturdays and Sundays."""
    weekday = ((dates_s // DAY) + 3) % 7  # 1970-01-01 was a Thursday (weekday 3)
    return np.where(weekday == 5, 0.75, np.where(weekday == 6, 0.6, 1.0))


def _history_day_weights() -> np.ndarray:
    """Share of the history's activity on each of its days: growing over time, lower at weekends."""
    starts = HISTORY_START_S + np.arange(HISTORY_DAYS) * DAY
    weights = np.linspace(0.8, 1.2, HISTORY_DAYS) * _week_factor(starts)
    return weights / weights.sum()


def _day_chunks(counts: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Split history days into chunks of whole days of at most CHUNK_ROWS rows: (day_lo, day_hi, row_lo, row_hi)."""
    chunks: list[tuple[int, int, int, int]] = []
    first_day, first_row, rows = 0, 0, 0
    for day, count in enumerate(counts.tolist()):
        if rows and rows + count > CHUNK_ROWS:
            chunks.append((first_day, day, first_row, first_row + rows))
            first_day, first_row, rows = day, first_row + rows, 0
        rows += count
    chunks.append((first_day, len(counts), first_row, first_row + rows))
    return chunks


def _history_times(rng: np.random.Generator, counts: np.ndarray, day_lo: int, day_hi: int) -> np.ndarray:
    """Sorted random seconds within each history day of the chunk, ``counts[day]`` per day."""
    starts = HISTORY_START_S + np.arange(day_lo, day_hi, dtype=np.int64) * DAY
    times = np.repeat(starts, counts[day_lo:day_hi])
    times += rng.integers(0, DAY, size=len(times))
    times.sort()
    return times


def _day_times(rng: np.random.Generator, start: int, n: int) -> np.ndarray:
    """Sorted random seconds within one day."""
    return np.sort(start + rng.integers(0, DAY, size=n))


def _history_changes(
    rng: np.random.Generator, created: np.ndarray, changed_share: float, deleted_share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """updated_at, deleted_at and the deleted mask of history rows (a deleted row's updated_at is its deleted_at)."""
    n = len(created)
    span = HISTORY_END_S - created
    changed = rng.random(n) < changed_share
    updated = created + np.where(changed, (rng.random(n) * span).astype(np.int64), 0)
    deleted_mask = rng.random(n) < deleted_share
    deleted = np.maximum(created + (rng.random(n) * span).astype(np.int64), updated)
    updated = np.where(deleted_mask, deleted, updated)
    return updated, np.where(deleted_mask, deleted, 0), deleted_mask


def _pick_earlier(rng: np.random.Generator, sorted_created: np.ndarray, times: np.ndarray) -> np.ndarray:
    """For each time, a random 1-based id among the rows created at or before it (ids sorted by creation)."""
    available = np.maximum(np.searchsorted(sorted_created, times, side="right"), 1)
    return (rng.random(len(times)) * available).astype(np.int64) + 1


def _sizes(scale: float) -> dict[str, int]:
    """Day-0 row counts of the entity tables at a scale."""
    return {name: max(MIN_SIZES[name], round(base * scale)) for name, base in BASE_SIZES.items()}


# --------------------------------------------------------------------------------------------------- rows


def _organization_rows(
    rng: np.random.Generator, ids: np.ndarray, created: np.ndarray, updated: np.ndarray, deleted: np.ndarray
) -> tuple[pa.Table, np.ndarray]:
    """Organizations rows and their department indexes; ``deleted`` 0 means not deleted."""
    n = len(ids)
    kind = rng.choice(len(ref.ORGANIZATION_KINDS), size=n, p=ref.ORGANIZATION_KIND_WEIGHTS)
    department = rng.choice(len(ref.DEPARTMENTS), size=n, p=ref.DEPARTMENT_WEIGHTS)
    city = ref.CITIES[rng.integers(len(ref.CITIES), size=n)]
    association = "Association " + ref.ASSOCIATION_WORDS[rng.integers(len(ref.ASSOCIATION_WORDS), size=n)] + " "
    public_body = ref.PUBLIC_BODY_WORDS[rng.integers(len(ref.PUBLIC_BODY_WORDS), size=n)] + " "
    company = (
        ref.LAST_NAMES[rng.integers(len(ref.LAST_NAMES), size=n)]
        + ref.COMPANY_SUFFIXES[rng.integers(len(ref.COMPANY_SUFFIXES), size=n)]
    )
    name = np.where(kind == 0, association + city, np.where(kind == 1, public_body + city, company))
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.int64()),
            "name": _strings(name),
            "kind": _strings(ref.ORGANIZATION_KINDS[kind]),
            "department": _strings(ref.DEPARTMENTS[department]),
            "created_at": _timestamps(created),
            "updated_at": _timestamps(updated),
            "deleted_at": _timestamps(deleted, null=deleted == 0),
        }
    )
    return table, department


def _mission_rows(
    rng: np.random.Generator,
    ids: np.ndarray,
    organization_ids: np.ndarray,
    organization_departments: np.ndarray,
    status: np.ndarray,
    created: np.ndarray,
    updated: np.ndarray,
    deleted: np.ndarray,
) -> pa.Table:
    """Missions rows: mostly in their organization's department, starting 3 to 60 days after creation."""
    n = len(ids)
    domain = rng.choice(len(ref.MISSION_DOMAINS), size=n, p=ref.MISSION_DOMAIN_WEIGHTS)
    title = ref.MISSION_TITLES[domain * ref.TITLES_PER_DOMAIN + rng.integers(ref.TITLES_PER_DOMAIN, size=n)]
    elsewhere = rng.random(n) < 0.1
    other_department = rng.choice(len(ref.DEPARTMENTS), size=n, p=ref.DEPARTMENT_WEIGHTS)
    department = np.where(elsewhere, other_department, organization_departments)
    places = np.minimum(rng.geometric(0.15, size=n), 80)
    start_date = created // DAY + rng.integers(3, 61, size=n)
    return pa.table(
        {
            "id": pa.array(ids, type=pa.int64()),
            "organization_id": pa.array(organization_ids, type=pa.int64()),
            "title": _strings(title),
            "domain": _strings(ref.MISSION_DOMAINS[domain]),
            "department": _strings(ref.DEPARTMENTS[department]),
            "places": pa.array(places, type=pa.int64()),
            "status": _strings(np.array(ref.MISSION_STATUSES, dtype=object)[status]),
            "start_date": _dates(start_date),
            "created_at": _timestamps(created),
            "updated_at": _timestamps(updated),
            "deleted_at": _timestamps(deleted, null=deleted == 0),
        }
    )


def _volunteer_rows(
    rng: np.random.Generator, ids: np.ndarray, department: np.ndarray, created: np.ndarray, updated: np.ndarray
) -> pa.Table:
    """Volunteers rows: French names, email from the name and the id, 06 phone, postcode of the department."""
    n = len(ids)
    first = rng.integers(len(ref.FIRST_NAMES), size=n)
    last = rng.integers(len(ref.LAST_NAMES), size=n)
    domain = rng.choice(len(ref.EMAIL_DOMAINS), size=n, p=ref.EMAIL_DOMAIN_WEIGHTS)
    email = (
        ref.FIRST_NAMES_EMAIL[first]
        + "."
        + ref.LAST_NAMES_EMAIL[last]
        + ids.astype(str).astype(object)
        + "@"
        + ref.EMAIL_DOMAINS[domain]
    )
    phone = "06" + np.char.zfill(rng.integers(0, 100_000_000, size=n).astype(str), 8).astype(object)
    variant = rng.integers(0, 1_000_000, size=n) % ref.POSTCODE_VARIANTS[department]
    postcode_number = ref.POSTCODE_BASE[department] + ref.POSTCODE_FIRST[department]
    postcode_number += variant * ref.POSTCODE_STEP[department]
    postcode = np.char.zfill(postcode_number.astype(str), 5).astype(object)
    young = rng.random(n) < 0.6
    birth_from = np.where(young, _epoch(dt.date(1990, 1, 1)), _epoch(dt.date(1950, 1, 1))) // DAY
    birth_to = np.where(young, _epoch(dt.date(2008, 12, 31)), _epoch(dt.date(1989, 12, 31))) // DAY
    birth_date = birth_from + (rng.random(n) * (birth_to - birth_from + 1)).astype(np.int64)
    return pa.table(
        {
            "id": pa.array(ids, type=pa.int64()),
            "email": _strings(email),
            "first_name": _strings(ref.FIRST_NAMES[first]),
            "last_name": _strings(ref.LAST_NAMES[last]),
            "phone": _strings(phone),
            "birth_date": _dates(birth_date),
            "postcode": _strings(postcode),
            "department": _strings(ref.DEPARTMENTS[department]),
            "created_at": _timestamps(created),
            "updated_at": _timestamps(updated),
        }
    )


def _application_rows(
    ids: np.ndarray,
    mission_ids: np.ndarray,
    volunteer_ids: np.ndarray,
    status: np.ndarray,
    created: np.ndarray,
    updated: np.ndarray,
) -> pa.Table:
    """Applications rows."""
    return pa.table(
        {
            "id": pa.array(ids, type=pa.int64()),
            "mission_id": pa.array(mission_ids, type=pa.int64()),
            "volunteer_id": pa.array(volunteer_ids, type=pa.int64()),
            "status": _strings(np.array(ref.APPLICATION_STATUSES, dtype=object)[status]),
            "created_at": _timestamps(created),
            "updated_at": _timestamps(updated),
        }
    )


def _event_rows(
    ids: np.ndarray, event_type: np.ndarray, partner_ids: np.ndarray, mission_ids: np.ndarray, occurred: np.ndarray
) -> pa.Table:
    """stats_events rows."""
    return pa.table(
        {
            "id": pa.array(ids, type=pa.int64()),
            "event_type": _strings(np.array(ref.EVENT_TYPES, dtype=object)[event_type]),
            "partner_id": pa.array(partner_ids, type=pa.int64()),
            "mission_id": pa.array(mission_ids, type=pa.int64()),
            "occurred_at": _timestamps(occurred),
        }
    )


# --------------------------------------------------------------------------------------------------- partners


def partner_ids(day: int) -> np.ndarray:
    """Ids of the partners that exist on a demo day: 12 at day 0, one more every 7th day."""
    return np.arange(1, ref.INITIAL_PARTNERS + day // PARTNER_EVERY_DAYS + 1, dtype=np.int64)


def _partner_weights(ids: np.ndarray, seed: int) -> np.ndarray:
    """Traffic share of each partner (0 for inactive ones)."""
    weights = np.array([ref.partner_traffic_weight(int(pid), seed) for pid in ids])
    return weights / weights.sum()


def _write_partners(bucket: Path, day: int, seed: int) -> Path:
    """Rewrite ``referentials/partners.csv`` whole with the partners of the day."""
    path = bucket / PARTNERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["partner_id", "name", "kind", "active"])
        for pid in partner_ids(day).tolist():
            name, kind, active = ref.partner(pid, seed)
            writer.writerow([pid, name, kind, "true" if active else "false"])
    partial.replace(path)
    return path


def _write_report(bucket: Path, date: dt.date, ids: np.ndarray, counts: np.ndarray, seed: int) -> Path:
    """Write what each active partner reports for a day: our counts, a few percent off for some partners."""
    active = np.array([ref.partner_traffic_weight(int(pid), seed) > 0 for pid in ids])
    factors = np.array([ref.partner_report_factor(int(pid), seed) for pid in ids])
    reported = np.rint(counts * factors[:, None]).astype(np.int64)[active]
    n = int(active.sum())
    table = pa.table(
        {
            "report_date": pa.array([date] * n, type=pa.date32()),
            "partner_id": pa.array(ids[active], type=pa.int64()),
            "impressions": pa.array(reported[:, 0], type=pa.int64()),
            "clicks": pa.array(reported[:, 1], type=pa.int64()),
            "applications": pa.array(reported[:, 2], type=pa.int64()),
        }
    )
    path = bucket / REPORTS_DIR / f"partner_report_{date.isoformat()}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    partial.replace(path)
    return path


def _clear_bucket(bucket: Path) -> None:
    """Remove the files the generator writes (and only those)."""
    (bucket / PARTNERS_FILE).unlink(missing_ok=True)
    reports = bucket / REPORTS_DIR
    if reports.is_dir():
        for path in reports.glob("partner_report_*.parquet"):
            path.unlink()


# --------------------------------------------------------------------------------------------------- meta


def _read_meta(source: Source) -> dict[str, str]:
    """The demo_meta key/values; raises when the source was never generated."""
    if not source.has_table(META_TABLE):
        raise NotGeneratedError(
            f"{source.description} holds no demo data (no {META_TABLE} table): generate day 0 first with "
            "`python -m datamart.demo` (or --if-missing)."
        )
    return {str(key): str(value) for key, value in source.query(f"SELECT key, value FROM {META_TABLE}")}


def _write_meta(source: Source, values: dict[str, str]) -> None:
    """Replace the demo_meta key/values."""
    source.execute(f"DELETE FROM {META_TABLE}")
    for key, value in sorted(values.items()):
        source.execute(f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)", (key, value))


# --------------------------------------------------------------------------------------------------- day 0


def _generate_history(source: Source, bucket: Path, seed: int, scale: float, summary: DaySummary) -> dict[str, str]:
    """Insert the 92 history days; return the demo_meta values."""
    sizes = _sizes(scale)
    weights = _history_day_weights()
    meta: dict[str, str] = {}

    def per_day(stream: int, total: int) -> np.ndarray:
        return _rng(seed, 0, stream).multinomial(total, weights)

    # organizations
    counts = per_day(S_ORG, sizes["organizations"])
    org_created_parts, org_department_parts = [], []
    for part, (day_lo, day_hi, row_lo, row_hi) in enumerate(_day_chunks(counts), 1):
        rng = _rng(seed, 0, S_ORG, part)
        created = _history_times(rng, counts, day_lo, day_hi)
        updated, deleted, deleted_mask = _history_changes(rng, created, 0.3, 0.03)
        table, department = _organization_rows(rng, np.arange(row_lo + 1, row_hi + 1), created, updated, deleted)
        source.insert("organizations", table)
        org_created_parts.append(created)
        org_department_parts.append(department)
        summary.tables["organizations"].inserted += table.num_rows
        summary.tables["organizations"].soft_deleted += int(deleted_mask.sum())
    org_created = np.concatenate(org_created_parts)
    org_department = np.concatenate(org_department_parts)

    # missions
    counts = per_day(S_MIS, sizes["missions"])
    mission_created_parts = []
    for part, (day_lo, day_hi, row_lo, row_hi) in enumerate(_day_chunks(counts), 1):
        rng = _rng(seed, 0, S_MIS, part)
        created = _history_times(rng, counts, day_lo, day_hi)
        updated, deleted, deleted_mask = _history_changes(rng, created, 0.5, 0.05)
        organization_ids = _pick_earlier(rng, org_created, created)
        status = rng.choice(3, size=len(created), p=[0.1, 0.65, 0.25])
        table = _mission_rows(
            rng,
            np.arange(row_lo + 1, row_hi + 1),
            organization_ids,
            org_department[organization_ids - 1],
            status,
            created,
            updated,
            deleted,
        )
        source.insert("missions", table)
        mission_created_parts.append(created)
        summary.tables["missions"].inserted += table.num_rows
        summary.tables["missions"].soft_deleted += int(deleted_mask.sum())
    mission_created = np.concatenate(mission_created_parts)

    # volunteers: exactly three of them in the rare department, never any other
    counts = per_day(S_VOL, sizes["volunteers"])
    rare_rows = _rng(seed, 0, S_VOL).choice(sizes["volunteers"], size=ref.RARE_DEPARTMENT_VOLUNTEERS, replace=False)
    volunteer_created_parts = []
    for part, (day_lo, day_hi, row_lo, row_hi) in enumerate(_day_chunks(counts), 1):
        rng = _rng(seed, 0, S_VOL, part)
        created = _history_times(rng, counts, day_lo, day_hi)
        updated, _, _ = _history_changes(rng, created, 0.2, 0.0)
        ids = np.arange(row_lo + 1, row_hi + 1)
        department = rng.choice(len(ref.DEPARTMENTS), size=len(ids), p=ref.DEPARTMENT_WEIGHTS)
        department[np.isin(ids - 1, rare_rows)] = ref.RARE_DEPARTMENT_INDEX
        table = _volunteer_rows(rng, ids, department, created, updated)
        source.insert("volunteers", table)
        volunteer_created_parts.append(created)
        summary.tables["volunteers"].inserted += table.num_rows
    volunteer_created = np.concatenate(volunteer_created_parts)

    # applications
    counts = per_day(S_APP, sizes["applications"])
    for part, (day_lo, day_hi, row_lo, row_hi) in enumerate(_day_chunks(counts), 1):
        rng = _rng(seed, 0, S_APP, part)
        created = _history_times(rng, counts, day_lo, day_hi)
        n = len(created)
        mission_ids = _pick_earlier(rng, mission_created, created)
        volunteer_ids = _pick_earlier(rng, volunteer_created, created)
        status = rng.choice(4, size=n, p=[0.3, 0.4, 0.2, 0.1])
        decided_within = np.minimum(HISTORY_END_S - created, 14 * DAY)
        updated = created + np.where(status == PENDING, 0, (rng.random(n) * decided_within).astype(np.int64))
        ids = np.arange(row_lo + 1, row_hi + 1)
        source.insert("applications", _application_rows(ids, mission_ids, volunteer_ids, status, created, updated))
        summary.tables["applications"].inserted += n

    # stats events, with the partner counts of the last history days for the reports
    partners = partner_ids(0)
    partner_weights = _partner_weights(partners, seed)
    total_events = max(MIN_EVENTS, EVENTS_PER_SCALE * scale)
    counts = _rng(seed, 0, S_EVT).poisson(total_events * weights)
    first_report_day = HISTORY_DAYS - REPORT_HISTORY_DAYS
    report_counts = np.zeros((REPORT_HISTORY_DAYS, len(partners), 3), dtype=np.int64)
    for part, (day_lo, day_hi, row_lo, row_hi) in enumerate(_day_chunks(counts), 1):
        rng = _rng(seed, 0, S_EVT, part)
        occurred = _history_times(rng, counts, day_lo, day_hi)
        n = len(occurred)
        event_type = rng.choice(3, size=n, p=ref.EVENT_TYPE_WEIGHTS)
        partner_index = rng.choice(len(partners), size=n, p=partner_weights)
        mission_ids = _pick_earlier(rng, mission_created, occurred)
        ids = np.arange(row_lo + 1, row_hi + 1)
        source.insert("stats_events", _event_rows(ids, event_type, partners[partner_index], mission_ids, occurred))
        summary.tables["stats_events"].inserted += n
        day_index = (occurred - HISTORY_START_S) // DAY - first_report_day
        recent = day_index >= 0
        flat = (day_index[recent] * len(partners) + partner_index[recent]) * 3 + event_type[recent]
        report_counts += np.bincount(flat, minlength=report_counts.size).reshape(report_counts.shape)

    summary.files.append(_write_partners(bucket, 0, seed))
    for offset in range(REPORT_HISTORY_DAYS):
        date = HISTORY_START + dt.timedelta(days=first_report_day + offset)
        summary.files.append(_write_report(bucket, date, partners, report_counts[offset], seed))

    meta.update(
        {
            "day": "0",
            "seed": str(seed),
            "scale": repr(float(scale)),
            "last_id.organizations": str(len(org_created)),
            "last_id.missions": str(len(mission_created)),
            "last_id.volunteers": str(len(volunteer_created)),
            "last_id.applications": str(sizes["applications"]),
            "last_id.stats_events": str(int(counts.sum())),
        }
    )
    return meta


def source_exists(source_url: str | None = None) -> bool:
    """Whether the source already holds the generated demo (its ``demo_meta`` table exists)."""
    source = open_source(source_url or default_source_url(), create=False)
    try:
        return source.has_table(META_TABLE)
    finally:
        source.close()


def generate(
    source_url: str | None = None,
    bucket: Path | None = None,
    scale: float = 1.0,
    seed: int = 42,
    reset: bool = False,
) -> DaySummary:
    """Generate day 0 (the 92 history days) into the source and the bucket, in one transaction."""
    if not scale > 0:
        raise DemoError(f"--scale must be positive, got {scale}")
    if seed < 0:
        raise DemoError(f"--seed must be zero or positive, got {seed}")
    bucket = Path(bucket) if bucket is not None else default_bucket()
    source = open_source(source_url or default_source_url())
    try:
        if not reset:
            if source.has_table(META_TABLE):
                day = _read_meta(source).get("day", "?")
                raise SourceExistsError(
                    f"{source.description} already holds the demo (day {day}). Use --advance-day to move it one "
                    "day forward, --reset to regenerate it from day 0, or --if-missing to keep it as it is."
                )
            present = [table for table in TABLES if source.has_table(table)]
            if present:
                raise SourceExistsError(
                    f"{source.description} already has tables {', '.join(present)} but no {META_TABLE}: "
                    "it was not written by this generator. Use --reset to drop and regenerate them."
                )
        summary = DaySummary(day=0, date=day_date(0))
        with source.transaction():
            if reset:
                source.drop_tables()
                _clear_bucket(bucket)
            source.create_tables()
            meta = _generate_history(source, bucket, seed, scale, summary)
            source.create_indexes()
            _write_meta(source, meta)
        return summary
    finally:
        source.close()


# --------------------------------------------------------------------------------------------------- day N+1


def _sample(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
    """k distinct values of a pool (fewer if the pool is smaller), sorted."""
    k = min(k, len(pool))
    return np.sort(rng.choice(pool, size=k, replace=False)) if k else pool[:0]


def _after(times: np.ndarray, not_before: np.ndarray, day_end: int) -> np.ndarray:
    """Times moved after what they depend on (a minute later), kept within the day."""
    return np.minimum(np.maximum(times, not_before + 60), day_end)


@dataclass
class _Day:
    """The day being applied: the source, the day and its seed, the last id of each table, the counts reported."""

    source: Source
    seed: int
    scale: float
    day: int
    start: int  # the day's first second (epoch)
    last_id: dict[str, int]
    counts: dict[str, TableCounts]

    @property
    def end(self) -> int:
        """The day's last second."""
        return self.start + DAY - 1

    def rng(self, stream: int) -> np.random.Generator:
        """The day's random stream of one step (each step draws from its own)."""
        return _rng(self.seed, self.day, stream)

    def new_ids(self, table: str, n: int) -> np.ndarray:
        """``n`` ids after the table's last one, counted as the day's inserts."""
        ids = np.arange(self.last_id[table] + 1, self.last_id[table] + n + 1)
        self.last_id[table] += n
        self.counts[table].inserted = n
        return ids


def _stamp(seconds: int | np.integer) -> str:
    """A source timestamp (``YYYY-MM-DD HH:MM:SS``) from epoch seconds."""
    return str(np.datetime64(int(seconds), "s")).replace("T", " ")


def _advance(source: Source, bucket: Path, meta: dict[str, str], summary: DaySummary) -> dict[str, str]:
    """Apply one day's changes, table after table; return the new demo_meta values."""
    last_id = {table: int(meta[f"last_id.{table}"]) for table in TABLES}
    today = _Day(source, int(meta["seed"]), float(meta["scale"]), summary.day, _epoch(summary.date), last_id,
                 summary.tables)  # fmt: skip
    applications = source.query_array(  # before today's changes: id, volunteer_id, status
        f"SELECT id, volunteer_id, {_APPLICATION_STATUS_SQL} FROM applications ORDER BY id", 3
    )
    organizations = _organizations(today)
    open_missions = _missions(today, organizations)
    erased_applications, volunteers = _volunteers(today, applications[1])
    _applications(today, applications, erased_applications, open_missions, volunteers)
    partners, report = _stats_events(today, open_missions)
    if summary.day % PARTNER_EVERY_DAYS == 0 or not (bucket / PARTNERS_FILE).exists():
        summary.files.append(_write_partners(bucket, summary.day, today.seed))
    summary.files.append(_write_report(bucket, summary.date, partners, report, today.seed))
    new_meta = dict(meta)
    new_meta["day"] = str(summary.day)
    new_meta.update({f"last_id.{table}": str(value) for table, value in last_id.items()})
    return new_meta


def _organizations(today: _Day) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft-delete a few organizations, insert new ones; the live ones after: ids, departments, since when."""
    org_ids, org_department_code = _department_rows(today.source)
    rng = today.rng(S_ORG_SOFT)
    soft_orgs = _sample(rng, org_ids, _at_least_one(rng, DAILY_SOFT_DELETED["organizations"] * today.scale))
    times = _day_times(rng, today.start, len(soft_orgs))
    today.counts["organizations"].soft_deleted = today.source.update(
        "organizations",
        ["updated_at", "deleted_at"],
        [(int(i), _stamp(t), _stamp(t)) for i, t in zip(soft_orgs, times, strict=True)],
    )
    rng = today.rng(S_ORG)
    n = _at_least_one(rng, DAILY_NEW["organizations"] * today.scale)
    new_org_ids = today.new_ids("organizations", n)
    new_org_created = _day_times(rng, today.start, n)
    table, new_org_department = _organization_rows(rng, new_org_ids, new_org_created, new_org_created, np.zeros(n))
    today.source.insert("organizations", table)
    live_orgs = ~np.isin(org_ids, soft_orgs)
    return (
        np.concatenate([org_ids[live_orgs], new_org_ids]),
        np.concatenate([org_department_code[live_orgs], new_org_department]),
        np.concatenate([np.full(int(live_orgs.sum()), today.start), new_org_created]),
    )


def _missions(today: _Day, organizations: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Update ~2 % of the missions, soft-delete a few, insert new ones (of live ``organizations``); the missions
    open to applications and traffic today, with the time they became so."""
    mission_ids, mission_status, mission_places = today.source.query_array(
        f"SELECT id, {_MISSION_STATUS_SQL}, places FROM missions WHERE deleted_at IS NULL ORDER BY id", 3
    )
    start = today.start
    rng = today.rng(S_MIS_CHANGE)
    n_updates = round(MISSION_UPDATE_SHARE * len(mission_ids))
    n_soft = _at_least_one(rng, DAILY_SOFT_DELETED["missions"] * today.scale)
    chosen = rng.permutation(len(mission_ids))[: n_updates + n_soft]
    updated_rows, soft_rows = np.sort(chosen[:n_updates]), np.sort(chosen[n_updates:])
    status, places = mission_status[updated_rows].copy(), mission_places[updated_rows].copy()
    draw = rng.random(len(updated_rows))
    status = np.where(
        status == DRAFT,
        PUBLISHED,
        np.where(
            (status == PUBLISHED) & (draw < 0.3), CLOSED, np.where((status == CLOSED) & (draw < 0.1), PUBLISHED, status)
        ),
    )
    change_places = status == mission_status[updated_rows]
    delta = rng.integers(1, 6, size=len(updated_rows)) * rng.choice([-1, 1], size=len(updated_rows))
    new_places = np.maximum(places + delta, 1)
    new_places = np.where(new_places == places, places + 1, new_places)
    places = np.where(change_places, new_places, places)
    update_times = _day_times(rng, start, len(updated_rows))
    update_times = update_times[rng.permutation(len(update_times))]
    statuses = ref.MISSION_STATUSES
    today.counts["missions"].updated = today.source.update(
        "missions",
        ["status", "places", "updated_at"],
        [
            (int(mission_ids[r]), statuses[int(s)], int(p), _stamp(t))
            for r, s, p, t in zip(updated_rows, status, places, update_times, strict=True)
        ],
    )
    soft_times = _day_times(rng, start, len(soft_rows))
    today.counts["missions"].soft_deleted = today.source.update(
        "missions",
        ["updated_at", "deleted_at"],
        [(int(mission_ids[r]), _stamp(t), _stamp(t)) for r, t in zip(soft_rows, soft_times, strict=True)],
    )
    final_status = mission_status.copy()
    final_status[updated_rows] = status
    open_since = np.full(len(mission_ids), start, dtype=np.int64)
    open_since[updated_rows] = np.where(mission_status[updated_rows] == PUBLISHED, start, update_times)
    is_open = final_status == PUBLISHED
    is_open[soft_rows] = False

    org_ids, org_department, org_since = organizations
    rng = today.rng(S_MIS)
    n = _at_least_one(rng, DAILY_NEW["missions"] * today.scale)
    pick = rng.integers(len(org_ids), size=n)
    created = _after(start + rng.integers(0, DAY, size=n), org_since[pick], today.end)
    order = np.argsort(created, kind="stable")
    pick, created = pick[order], created[order]
    new_status = np.where(rng.random(n) < 0.8, PUBLISHED, DRAFT)
    new_mission_ids = today.new_ids("missions", n)
    table = _mission_rows(
        rng, new_mission_ids, org_ids[pick], org_department[pick], new_status, created, created, np.zeros(n)
    )
    today.source.insert("missions", table)
    return (
        np.concatenate([mission_ids[is_open], new_mission_ids[new_status == PUBLISHED]]),
        np.concatenate([open_since[is_open], created[new_status == PUBLISHED]]),
    )


def _volunteers(today: _Day, application_volunteer: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Right-to-erasure requests (hard delete, with their applications), then new volunteers; which applications
    (of ``application_volunteer``, each application's volunteer) were erased, and the volunteers after: ids, since
    when."""
    volunteer_ids, volunteer_rare = today.source.query_array(
        f"SELECT id, CASE WHEN department = '{ref.RARE_DEPARTMENT}' THEN 1 ELSE 0 END FROM volunteers ORDER BY id", 2
    )
    rng = today.rng(S_ERASE)
    erasable = volunteer_ids[volunteer_rare == 0]
    erased = _sample(rng, erasable, _at_least_one(rng, DAILY_ERASED_VOLUNTEERS * today.scale))
    erased_applications = np.isin(application_volunteer, erased)
    today.counts["applications"].hard_deleted += today.source.delete_in("applications", "volunteer_id", erased)
    today.counts["volunteers"].hard_deleted = today.source.delete_in("volunteers", "id", erased)
    rng = today.rng(S_VOL)
    n = _at_least_one(rng, DAILY_NEW["volunteers"] * today.scale)
    new_volunteer_ids = today.new_ids("volunteers", n)
    created = _day_times(rng, today.start, n)
    department = rng.choice(len(ref.DEPARTMENTS), size=n, p=ref.DEPARTMENT_WEIGHTS)
    today.source.insert("volunteers", _volunteer_rows(rng, new_volunteer_ids, department, created, created))
    kept = ~np.isin(volunteer_ids, erased)
    return erased_applications, (
        np.concatenate([volunteer_ids[kept], new_volunteer_ids]),
        np.concatenate([np.full(int(kept.sum()), today.start), created]),
    )


def _applications(
    today: _Day,
    applications: tuple[np.ndarray, np.ndarray, np.ndarray],
    erased: np.ndarray,
    open_missions: tuple[np.ndarray, np.ndarray],
    volunteers: tuple[np.ndarray, np.ndarray],
) -> None:
    """Pending ``applications`` (id, volunteer, status) withdrawn (hard-deleted), ~3 % of the others change status
    (``erased`` ones left out: gone with their volunteer), then new ones to ``open_missions`` from ``volunteers``."""
    application_ids, _, application_status = applications
    start = today.start
    rng = today.rng(S_WITHDRAW)
    withdrawable = application_ids[(application_status == PENDING) & ~erased]
    withdrawn = _sample(rng, withdrawable, _at_least_one(rng, DAILY_WITHDRAWN_APPLICATIONS * today.scale))
    today.counts["applications"].hard_deleted += today.source.delete_in("applications", "id", withdrawn)
    rng = today.rng(S_APP_CHANGE)
    remaining = np.flatnonzero(~erased & ~np.isin(application_ids, withdrawn))
    rows = np.sort(
        rng.choice(remaining, size=min(len(remaining), round(APPLICATION_UPDATE_SHARE * len(remaining))), replace=False)
    )
    current = application_status[rows]
    draw = rng.random(len(rows))
    from_pending = np.where(draw < 0.5, ACCEPTED, np.where(draw < 0.8, REFUSED, CANCELLED))
    transitions = np.array([PENDING, CANCELLED, ACCEPTED, PENDING])  # accepted→cancelled, refused→accepted, …
    status = np.where(current == PENDING, from_pending, transitions[current])
    times = _day_times(rng, start, len(rows))[rng.permutation(len(rows))]
    statuses = ref.APPLICATION_STATUSES
    today.counts["applications"].updated = today.source.update(
        "applications",
        ["status", "updated_at"],
        [(int(application_ids[r]), statuses[int(s)], _stamp(t)) for r, s, t in zip(rows, status, times, strict=True)],
    )
    rng = today.rng(S_APP)
    n = _at_least_one(rng, DAILY_NEW["applications"] * today.scale)
    open_mission_ids, open_mission_since = open_missions
    volunteer_pool, volunteer_since = volunteers
    if len(open_mission_ids) == 0:
        raise DemoError("no published mission is left to apply to; regenerate the demo with --reset")
    mission_pick = rng.integers(len(open_mission_ids), size=n)
    volunteer_pick = rng.integers(len(volunteer_pool), size=n)
    created = start + rng.integers(0, DAY, size=n)
    created = _after(created, np.maximum(open_mission_since[mission_pick], volunteer_since[volunteer_pick]), today.end)
    order = np.argsort(created, kind="stable")
    new_ids = today.new_ids("applications", n)
    today.source.insert(
        "applications",
        _application_rows(
            new_ids,
            open_mission_ids[mission_pick[order]],
            volunteer_pool[volunteer_pick[order]],
            np.zeros(n, dtype=np.int64),
            created[order],
            created[order],
        ),
    )


def _stats_events(today: _Day, open_missions: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The day's stats events on ``open_missions``; the partners and their report of them (events per type)."""
    start = today.start
    rng = today.rng(S_EVT)
    partners = partner_ids(today.day)
    expected = (
        max(MIN_EVENTS, EVENTS_PER_SCALE * today.scale) / HISTORY_DAYS * 1.2 * float(_week_factor(np.array([start]))[0])
    )
    n = _at_least_one(rng, expected)
    event_type = rng.choice(3, size=n, p=ref.EVENT_TYPE_WEIGHTS)
    partner_index = rng.choice(len(partners), size=n, p=_partner_weights(partners, today.seed))
    open_mission_ids, open_mission_since = open_missions
    mission_pick = rng.integers(len(open_mission_ids), size=n)
    occurred = _after(start + rng.integers(0, DAY, size=n), open_mission_since[mission_pick], today.end)
    order = np.argsort(occurred, kind="stable")
    event_ids = today.new_ids("stats_events", n)
    today.source.insert(
        "stats_events",
        _event_rows(
            event_ids,
            event_type[order],
            partners[partner_index[order]],
            open_mission_ids[mission_pick[order]],
            occurred[order],
        ),
    )
    report = np.bincount(partner_index * 3 + event_type, minlength=len(partners) * 3).reshape(len(partners), 3)
    return partners, report


def _department_rows(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """Ids and department indexes of the live organizations."""
    index = {code: i for i, code in enumerate(ref.DEPARTMENTS.tolist())}
    ids: list[int] = []
    departments: list[int] = []
    for batch in source.query_batches("SELECT id, department FROM organizations WHERE deleted_at IS NULL ORDER BY id"):
        for org_id, department in batch:
            ids.append(int(org_id))
            departments.append(index[str(department)])
    return np.array(ids, dtype=np.int64), np.array(departments, dtype=np.int64)


def advance_day(source_url: str | None = None, bucket: Path | None = None) -> DaySummary:
    """Apply the changes of day N+1 (N read from demo_meta, with the seed and scale), in one transaction."""
    bucket = Path(bucket) if bucket is not None else default_bucket()
    source = open_source(source_url or default_source_url(), create=False)
    try:
        meta = _read_meta(source)
        day = int(meta["day"]) + 1
        summary = DaySummary(day=day, date=day_date(day))
        with source.transaction():
            new_meta = _advance(source, bucket, meta, summary)
            _write_meta(source, new_meta)
        return summary
    finally:
        source.close()
