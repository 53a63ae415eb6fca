/* Kind INCREMENTAL_BY_UNIQUE_KEY, as marts.missions_v1 (read its header first): each refresh recomputes only the
   organizations touched since the last one and merges them by organization_id. Touched: the organization's row written
   by a dlt load of the interval (_dlt_load_id), a version of one of its missions written or retired in it (a retired
   version carries the organization the mission left), an application written in it (through its mission), or a row
   removed in it (ops.deleted_rows: a deleted organization, a deleted mission naming its organization, a withdrawn
   application naming its mission). A touched organization that no longer exists comes out with an empty
   organization_kind and the statement after the query deletes it. A first build computes every organization. The
   conditions are macros/incremental.py's. */
MODEL (
  name marts.organizations_v1,
  kind INCREMENTAL_BY_UNIQUE_KEY (
    unique_key organization_id
  ),
  cron '*/5 * * * *',
  interval_unit 'day',
  allow_partials TRUE,
  grain organization_id,
  audits (
    not_null(
      columns := (
        organization_id,
        organization_name,
        organization_kind,
        live_missions,
        published_missions,
        applications
      )
    ),
    unique_values(columns := (
      organization_id
    )),
    accepted_values("column" := organization_kind, is_in := ('association', 'public_body', 'company')),
    forall(criteria := (
      published_missions <= live_missions
    )),
    assert_no_personal_columns
  ),
  description 'Organizations publishing volunteering missions, one row per organization that exists today (deleted organizations are left out), with how many missions it has and how many applications they received. Answers: how many associations, public bodies and companies use the platform, per department? Which organizations publish the most missions? Which have no published mission? Which receive the most applications?',
  column_descriptions (
    organization_id = 'Number of the organization in the platform.',
    organization_name = 'Name of the organization.',
    organization_kind = 'Kind of organization: association, public_body or company.',
    department = 'Department code of the organization (75 = Paris, 2A = Corse-du-Sud, 971 = Guadeloupe…).',
    live_missions = 'Missions of the organization that exist today, whatever their status (draft, published or closed).',
    published_missions = 'Missions of the organization open to volunteers today.',
    applications = 'Applications received by the missions of the organization, whatever the answer.',
    created_at = 'When the organization joined the platform (UTC).'
  )
);

WITH touched_missions AS (
  SELECT
    mission_id::BIGINT AS mission_id
  FROM raw_app_db.applications
  WHERE
    @loaded_in_interval()
  UNION
  SELECT
    referenced_key::BIGINT AS mission_id
  FROM ops.deleted_rows
  WHERE
    dataset = 'raw_app_db'
    AND table_name = 'applications'
    AND referenced_table = 'missions'
    AND @ended_in_interval(deleted_at)
), touched AS (
  SELECT
    id::BIGINT AS organization_id
  FROM raw_app_db.organizations
  WHERE
    @loaded_in_interval()
  UNION
  SELECT
    organization_id::BIGINT AS organization_id
  FROM raw_app_db.missions
  WHERE
    @loaded_in_interval() OR @ended_in_interval(_dlt_valid_to)
  UNION
  SELECT
    CASE WHEN table_name = 'organizations' THEN row_key ELSE referenced_key END::BIGINT AS organization_id
  FROM ops.deleted_rows
  WHERE
    dataset = 'raw_app_db'
    AND (
      table_name = 'organizations'
      OR (
        table_name = 'missions' AND referenced_table = 'organizations'
      )
    )
    AND @ended_in_interval(deleted_at)
  UNION
  SELECT
    organization_id
  FROM staging.stg_app_db__missions
  WHERE
    mission_id IN (
      SELECT
        mission_id
      FROM touched_missions
    )
), organizations AS (
  SELECT
    organization_id,
    organization_name,
    organization_kind,
    department,
    created_at
  FROM staging.stg_app_db__organizations
  WHERE
    @first_build()
    OR organization_id IN (
      SELECT
        organization_id
      FROM touched
    )
), organization_missions AS (
  SELECT
    organization_id,
    live_missions,
    published_missions,
    applications
  FROM intermediate.int_organization_missions
  WHERE
    @first_build()
    OR organization_id IN (
      SELECT
        organization_id
      FROM touched
    )
), organizations_with_missions AS (
  SELECT
    organizations.organization_id,
    organizations.organization_name,
    organizations.organization_kind,
    organizations.department,
    COALESCE(organization_missions.live_missions, 0) AS live_missions,
    COALESCE(organization_missions.published_missions, 0) AS published_missions,
    COALESCE(organization_missions.applications, 0) AS applications,
    organizations.created_at
  FROM organizations
  LEFT JOIN organization_missions
    ON organizations.organization_id = organization_missions.organization_id
), gone AS (
  /* touched organizations that no longer exist: rows with an empty organization_kind, deleted by the statement
     after the query (never on a first build) */
  SELECT
    organization_id
  FROM touched
  WHERE
    NOT organization_id IN (
      SELECT
        organization_id
      FROM organizations
    )
    AND NOT @first_build()
), changes AS (
  SELECT
    *
  FROM organizations_with_missions
  UNION ALL
  SELECT
    organization_id,
    NULL AS organization_name,
    NULL AS organization_kind,
    NULL AS department,
    NULL AS live_missions,
    NULL AS published_missions,
    NULL AS applications,
    NULL AS created_at
  FROM gone
)
SELECT
  organization_id,
  organization_name,
  organization_kind,
  department,
  live_missions,
  published_missions,
  applications,
  created_at
FROM changes;

/* the touched organizations that no longer exist (see the top of this file) */
DELETE FROM @this_model
WHERE
  organization_kind IS NULL