"""Metabase's read-only PostgreSQL role: it connects, sees the published schema, selects from its views, nothing else.

SQLMesh swaps a prod view by ``DROP VIEW … CASCADE`` + ``CREATE VIEW`` (PostgreSQL cannot ``CREATE OR REPLACE`` a
view whose columns change), and a dropped view takes its grants with it. So the grant must come WITH the view, not
after the run: ``ALTER DEFAULT PRIVILEGES FOR ROLE <the warehouse user> IN SCHEMA marts GRANT SELECT ON TABLES TO
<role>`` makes PostgreSQL grant SELECT on every view that user creates in ``marts``, inside the very transaction that
creates it (SQLMesh swaps each view in one transaction). A view is therefore readable by Metabase from the instant it
exists, whichever command promoted it (``make promote``, ``make run``, the scheduled run, a plain ``sqlmesh plan``),
and whatever happens next (a failed audit, a killed process, a server restart): nothing is left to re-apply.

Why not SQLMesh's own model ``grants`` property (which 0.236 has, applied in the same transaction too): the grantee
would be written in every published model, so renaming the role (``datamart.metabase_role``) would change every
published model's fingerprint; a role not created yet would fail every plan, dev environments included (SQLMesh
grants on each environment's views); and it cannot create the role, give CONNECT/USAGE or revoke the rest.

What this module keeps, because neither can do it: create (or check) the role and its password, and give it, on the
warehouse database only: CONNECT on the database, USAGE on ``marts``, SELECT on what ``marts`` already holds, the
default privileges above. Everything else is revoked from the role and, where PUBLIC would give it, from PUBLIC: every
other schema (raw datasets, staging, intermediate, SQLMesh's physical ``sqlmesh__*`` schemas and its state schema,
other environments' ``<schema>__<env>``), CREATE on ``marts``, CREATE on schema ``public`` (PostgreSQL 15 no longer
gives it to PUBLIC, older servers still do: any role could create tables there) and CREATE on the database (never a
default, revoked in case someone granted it) and TEMPORARY on the database (no scratch tables: the job's own user keeps
it). PUBLIC keeps USAGE on schema ``public`` (extensions' functions live there) and CONNECT on the database; the
datamart database is a dedicated one. The server's other databases are not ours to change: the report names those
the role can connect to (PostgreSQL gives CONNECT to PUBLIC) and the statement their owner runs. Running it again is
harmless (every statement is idempotent, in one transaction): ``make promote`` and ``make run`` do, to revoke what new
schemas may give.

The role name is the dlt config value ``datamart.metabase_role`` (default ``metabase``); its password is the secret
``datamart.metabase_password`` (``DATAMART__METABASE_PASSWORD``). The password is hashed on the client (SCRAM or MD5,
as the server expects), so it never travels nor lands in a server log in clear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datamart.settings import PUBLISHED_SCHEMA, SettingsError, Warehouse, configure_environment, secret

DEFAULT_ROLE = "metabase"
# Attributes that would let the role read or change more than the published views.
_FORBIDDEN_ATTRIBUTES = {
    "rolsuper": "SUPERUSER",
    "rolcreatedb": "CREATEDB",
    "rolcreaterole": "CREATEROLE",
    "rolreplication": "REPLICATION",
    "rolbypassrls": "BYPASSRLS",
}
# Built-in roles whose membership reads or writes every table.
_FORBIDDEN_MEMBERSHIPS = ("pg_read_all_data", "pg_write_all_data", "pg_write_server_files", "pg_execute_server_program")


class GrantError(SettingsError):
    """The Metabase role cannot be set up safely; the message names the role and the fix."""


@dataclass
class GrantReport:
    """What :func:`apply_metabase_grants` did."""

    role: str
    views: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    created: bool = False
    can_login: bool = False
    other_databases: list[str] = field(default_factory=list)  # of the same server, that the role can connect to

    def format(self) -> str:
        """Lines for the run summary (never the password)."""
        views = ", ".join(self.views) if self.views else "none"
        created = ", created" if self.created else ""
        login = "" if self.can_login else ", NOLOGIN"
        lines = [f"Metabase role {self.role}{created}{login}: may read {views} (and nothing else)"]
        lines += [f"WARNING: {warning}" for warning in self.warnings]
        if self.other_databases:
            shown = ", ".join(self.other_databases[:5]) + (", …" if len(self.other_databases) > 5 else "")
            lines.append(
                f"  it can also connect to {len(self.other_databases)} other database(s) of the server ({shown}), "
                "as PostgreSQL lets every role: their owner closes each with REVOKE CONNECT ON DATABASE <name> "
                "FROM PUBLIC (docs/privacy.md)"
            )
        return "\n".join(lines)


def metabase_role_name() -> str:
    """The configured role name (``datamart.metabase_role``, default ``metabase``)."""
    import dlt

    configure_environment()
    name = dlt.config.get("datamart.metabase_role")
    name = str(name).strip() if name is not None else DEFAULT_ROLE
    if not name:
        raise GrantError("datamart.metabase_role is empty: set DATAMART__METABASE_ROLE to a role name, e.g. metabase.")
    return name


def metabase_password() -> str | None:
    """The role's password from the secret ``datamart.metabase_password``, or None when it is not set."""
    configure_environment()
    password = secret("datamart.metabase_password")
    return None if password is None else str(password)


def apply_metabase_grants(warehouse: Warehouse) -> GrantReport | None:
    """Create or check Metabase's role and grant it the published views only; None on DuckDB (a file has no roles)."""
    if not warehouse.is_server:
        return None
    import psycopg2

    role = metabase_role_name()
    password = metabase_password()
    if role.lower() in ("public", "none", "current_user", "session_user") or role.startswith("pg_"):
        raise GrantError(f"datamart.metabase_role={role!r} is a reserved name: set DATAMART__METABASE_ROLE=metabase.")
    if role == warehouse.pg.username:
        raise GrantError(
            f"datamart.metabase_role={role!r} is the warehouse's own user (the one dlt and SQLMesh write with): "
            "give Metabase a separate role, e.g. DATAMART__METABASE_ROLE=metabase."
        )
    pg = warehouse.pg
    conn = warehouse.pg_connect()
    try:
        with conn:  # one transaction: commit on success, rollback on any error
            with conn.cursor() as cur:
                report = _apply(cur, conn, role, password, str(pg.database))
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise GrantError(
            f"cannot set up the Metabase role {role!r} as {pg.username!r}: {str(exc).strip()}. Run the job with a "
            f"warehouse user that owns the database {pg.database!r} and has CREATEROLE, or have an administrator "
            f"create the role once: CREATE ROLE {role} LOGIN PASSWORD '…'."
        ) from None
    finally:
        conn.close()
    return report


def _apply(cur: Any, conn: Any, role: str, password: str | None, database: str) -> GrantReport:
    """The grants and revokes, on an open transaction."""
    from psycopg2 import sql
    from psycopg2.extensions import encrypt_password

    report = GrantReport(role=role)
    who = sql.Identifier(role)
    db = sql.Identifier(database)
    published = sql.Identifier(PUBLISHED_SCHEMA)

    # Serialise concurrent runs (two jobs promoting at once) on this role's grants.
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"datamart.metabase_grants.{role}",))
    attributes = ", ".join(_FORBIDDEN_ATTRIBUTES)
    cur.execute(f"SELECT rolcanlogin, {attributes} FROM pg_roles WHERE rolname = %s", (role,))
    row = cur.fetchone()
    if row is None:
        if password is not None:
            hashed = encrypt_password(password, role, conn)
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(who), (hashed,))
        else:
            cur.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(who))
        cur.execute(
            sql.SQL("COMMENT ON ROLE {} IS %s").format(who),
            ("Metabase: reads the published datamart views only (datamart/grants.py: default privileges)",),
        )
        report.created = True
        report.can_login = password is not None
    else:
        forbidden = [name for name, value in zip(_FORBIDDEN_ATTRIBUTES.values(), row[1:], strict=True) if value]
        if forbidden:
            raise GrantError(
                f"the Metabase role {role!r} has {', '.join(forbidden)}: it could read or change everything. "
                f"Remove them (ALTER ROLE {role} {' '.join('NO' + a for a in forbidden)}) or point "
                "DATAMART__METABASE_ROLE at a plain role."
            )
        report.can_login = bool(row[0])
        if password is not None:
            # The secret is the source of truth: a role created NOLOGIN by an earlier run can log in once it is set.
            hashed = encrypt_password(password, role, conn)
            cur.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD %s").format(who), (hashed,))
            report.can_login = True
    if not report.can_login:
        report.warnings.append(
            f"role {role} cannot log in (no password): set the secret datamart.metabase_password "
            "(DATAMART__METABASE_PASSWORD, or [datamart] metabase_password in .dlt/secrets.toml) and run again."
        )
    _check_memberships(cur, role, report)

    cur.execute("SELECT current_user")
    creator = sql.Identifier(cur.fetchone()[0])  # the user dlt and SQLMesh connect as: the views' creator
    # The database: connect, never create schemas nor temporary tables; PUBLIC must not give CREATE or TEMP either
    # (the job's own user keeps TEMP, whether or not it owns the database).
    cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, who))
    cur.execute(sql.SQL("REVOKE CREATE, TEMPORARY ON DATABASE {} FROM PUBLIC, {}").format(db, who))
    cur.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(db, creator))
    # Schema public: PostgreSQL < 15 lets every role create tables there (PUBLIC has CREATE); 15 no longer does.
    cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'public'")
    if cur.fetchone():
        cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC, {}").format(who))

    # Every schema but the published one: nothing for the role, nothing through PUBLIC either.
    cur.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%%' AND nspname <> 'information_schema' "
        "AND nspname <> %s ORDER BY nspname",
        (PUBLISHED_SCHEMA,),
    )
    for (schema,) in cur.fetchall():
        name = sql.Identifier(schema)
        if schema == "public":  # keep PUBLIC's USAGE: extensions' functions live there; the role gets nothing
            cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(name, who))
        else:
            cur.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC, {}").format(name, who))
        cur.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM PUBLIC, {}").format(name, who))
        cur.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM PUBLIC, {}").format(name, who))
        cur.execute(sql.SQL("REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {} FROM {}").format(name, who))

    # The published schema: created now if the first prod plan has not run yet (SQLMesh creates it IF NOT EXISTS), so
    # that the default privileges hold from its very first view.
    cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (PUBLISHED_SCHEMA,))
    if cur.fetchone() is None:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(published))
    cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(published, who))
    cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA {} FROM PUBLIC, {}").format(published, who))
    # Every view the warehouse user creates there is readable from its creation, in the creating transaction.
    cur.execute(
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
            creator, published, who
        )
    )
    # What exists already: SELECT, nothing more (the revoke and the grant commit together: no reader sees a gap).
    cur.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(published, who))
    cur.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(published, who))
    cur.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(published, who))
    cur.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'm', 'p', 'f') ORDER BY c.relname",
        (PUBLISHED_SCHEMA,),
    )
    report.views = [f"{PUBLISHED_SCHEMA}.{relation}" for (relation,) in cur.fetchall()]
    if not report.views:
        report.warnings.append(
            f"schema {PUBLISHED_SCHEMA} holds no view yet: Metabase will see each view from the prod plan that creates "
            "it (sqlmesh plan, make promote)."
        )

    # The server's other databases: PostgreSQL gives CONNECT on each to PUBLIC; only their owner can take it back.
    cur.execute(
        "SELECT datname FROM pg_database WHERE datallowconn AND datname <> %s "
        "AND has_database_privilege(%s, datname, 'CONNECT') ORDER BY datname",
        (database, role),
    )
    report.other_databases = [name for (name,) in cur.fetchall()]

    _verify(cur, role, database, report)
    return report


def _check_memberships(cur: Any, role: str, report: GrantReport) -> None:
    """Refuse a role that inherits everything (pg_read_all_data, a superuser); warn about other memberships."""
    cur.execute(
        "SELECT g.rolname, g.rolsuper FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
        "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s ORDER BY g.rolname",
        (role,),
    )
    groups = cur.fetchall()
    dangerous = [name for name, is_super in groups if is_super or name in _FORBIDDEN_MEMBERSHIPS]
    if dangerous:
        raise GrantError(
            f"the Metabase role {role!r} is a member of {', '.join(dangerous)}, which reads everything: "
            f"REVOKE {', '.join(dangerous)} FROM {role}, or point DATAMART__METABASE_ROLE at a plain role."
        )
    others = [name for name, _ in groups]
    if others:
        report.warnings.append(
            f"role {role} is a member of {', '.join(others)}: it may also read what those roles can read "
            f"(REVOKE … FROM {role} if that is not intended)."
        )


def _verify(cur: Any, role: str, database: str, report: GrantReport) -> None:
    """Fail the transaction if a revoke silently did nothing (REVOKE only warns when we do not own the object)."""
    cur.execute(
        "SELECT has_database_privilege(%s, %s, 'CREATE'), has_database_privilege(%s, %s, 'TEMPORARY')",
        (role, database, role, database),  # counts what PUBLIC gives too
    )
    held = cur.fetchone()
    can = [what for what, has in zip(("create schemas", "create temporary tables"), held, strict=True) if has]
    if can:
        raise GrantError(
            f"the Metabase role {role!r} can still {' and '.join(can)} in database {database!r}: run the job as "
            f"the database's owner, or as the owner run REVOKE CREATE, TEMPORARY ON DATABASE {database} FROM "
            f"PUBLIC, {role}."
        )
    cur.execute(
        "SELECT n.nspname FROM pg_namespace n WHERE n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'information_schema' "
        "AND (has_schema_privilege(%s, n.oid, 'CREATE') "
        "OR (n.nspname NOT IN (%s, 'public') AND has_schema_privilege(%s, n.oid, 'USAGE'))) ORDER BY 1",
        (role, PUBLISHED_SCHEMA, role),
    )
    leaks = [schema for (schema,) in cur.fetchall()]
    if leaks:
        raise GrantError(
            f"the Metabase role {role!r} still has privileges on schema(s) {', '.join(leaks)} after the revokes "
            "(they are owned by another user, or granted by one): run the job as their owner, or as the owner run "
            f"REVOKE ALL ON SCHEMA … FROM PUBLIC, {role}."
        )
