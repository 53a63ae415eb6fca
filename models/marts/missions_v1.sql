/* Kind INCREMENTAL_BY_UNIQUE_KEY: each refresh recomputes only the missions touched since the last one, and merges
   them into the table by mission_id. Touched: a version of the mission, one of its applications or its organization
   written by a dlt load of the interval (_dlt_load_id, the epoch second the load started), a version retired in it
   (_dlt_valid_to: a deleted mission), or a row removed in it (ops.deleted_rows, written by the delete step: a
   withdrawn application names its mission, a deleted organization its id). These load and deletion records are not
   business data, so the staging views do not carry them: the touched keys are read here from the raw tables and
   ops.deleted_rows, the mart's values still from staging and intermediate. A touched mission that no longer exists
   comes out with an empty mission_status, merged like the others, and the statement after the query deletes it
   (when_matched could delete it in the merge itself, but SQLMesh 0.236's DuckDB adapter merges by delete + insert
   and refuses when_matched: LogicalMergeMixin, sqlmesh/core/engine_adapter/mixins.py). allow_partials and the refresh's
   run with ignore_cron (datamart/transform.py) make an interval end at the refresh itself, not at a cron tick;
   interval_unit day keeps SQLMesh's interval bookkeeping small (a 5-minute unit since the start: 120,000 intervals).
   Deletions and retirements are re-read for one day before the interval: a refresh running while another process
   deletes still sees them afterwards. A first build (or a restatement, which SQLMesh does whole for this kind) starts
   at the project's start (variable project_start, datamart/sqlmesh_config.py) and computes every mission, with no
   deletion row. The three conditions are macros (@loaded_in_interval, @ended_in_interval, @first_build:
   macros/incremental.py), shared with organizations_v1. */
MODEL (
  name marts.missions_v1,
  kind INCREMENTAL_BY_UNIQUE_KEY (
    unique_key mission_id
  ),
  cron '*/5 * * * *',
  interval_unit 'day',
  allow_partials TRUE,
  grain mission_id,
  audits (
    not_null(
      columns := (
        mission_id,
        mission_status,
        applications_total,
        applications_accepted,
        applications_pending
      )
    ),
    unique_values(columns := (
      mission_id
    )),
    accepted_values("column" := mission_status, is_in := ('draft', 'published', 'closed')),
    forall(
      criteria := (
        applications_accepted + applications_pending <= applications_total
      )
    ),
    assert_no_personal_columns,
    assert_recent_data(
      "column" := last_updated_at,
      reference_table := raw_app_db.missions,
      reference_column := updated_at,
      max_age_days := 7
    )
  ),
  description 'Missions offered to volunteers, one row per mission that exists today (deleted missions are left out), with the organization that publishes it and how many volunteers applied. Answers: how many missions are published per domain or department? Which missions receive the most applications, or none? How many applications are still waiting for an answer? How many places are offered?',
  column_descriptions (
    mission_id = 'Number of the mission in the platform.',
    mission_title = 'Title of the mission.',
    domain = 'Domain of the mission: environment, education, health, solidarity, culture or sport.',
    department = 'Department code where the mission takes place (75 = Paris, 2A = Corse-du-Sud, 971 = Guadeloupe…).',
    mission_status = 'draft (not visible yet), published (open to volunteers) or closed.',
    places = 'Number of volunteers the organization is looking for.',
    start_date = 'Day the mission starts.',
    organization_id = 'Number of the organization publishing the mission.',
    organization_name = 'Name of the organization publishing the mission (empty if the organization was deleted).',
    organization_kind = 'Kind of organization: association, public_body or company.',
    applications_total = 'Volunteers who applied to the mission, whatever the answer.',
    applications_accepted = 'Applications accepted by the organization.',
    applications_pending = 'Applications still waiting for an answer.',
    created_at = 'When the mission was created (UTC).',
    last_updated_at = 'When the mission last changed (UTC).'
  )
);

WITH touched AS (
  SELECT
    id::BIGINT AS mission_id
  FROM raw_app_db.missions
  WHERE
    @loaded_in_interval() OR @ended_in_interval(_dlt_valid_to)
  UNION
  SELECT
    mission_id::BIGINT AS mission_id
  FROM raw_app_db.applications
  WHERE
    @loaded_in_interval()
  UNION
  SELECT
    CASE WHEN table_name = 'missions' THEN row_key ELSE referenced_key END::BIGINT AS mission_id
  FROM ops.deleted_rows
  WHERE
    dataset = 'raw_app_db'
    AND (
      table_name = 'missions'
      OR (
        table_name = 'applications' AND referenced_table = 'missions'
      )
    )
    AND @ended_in_interval(deleted_at)
  UNION
  SELECT
    mission_id
  FROM staging.stg_app_db__missions
  WHERE
    organization_id IN (
      SELECT
        id::BIGINT
      FROM raw_app_db.organizations
      WHERE
        @loaded_in_interval()
      UNION
      SELECT
        row_key::BIGINT
      FROM ops.deleted_rows
      WHERE
        dataset = 'raw_app_db'
        AND table_name = 'organizations'
        AND @ended_in_interval(deleted_at)
    )
), missions AS (
  SELECT
    mission_id,
    organization_id,
    mission_title,
    domain,
    department,
    places,
    mission_status,
    start_date,
    created_at,
    updated_at
  FROM staging.stg_app_db__missions
  WHERE
    @first_build() OR mission_id IN (
      SELECT
        mission_id
      FROM touched
    )
), organizations AS (
  SELECT
    organization_id,
    organization_name,
    organization_kind
  FROM staging.stg_app_db__organizations
), mission_applications AS (
  SELECT
    mission_id,
    applications_total,
    applications_accepted,
    applications_pending
  FROM intermediate.int_mission_applications
  WHERE
    @first_build() OR mission_id IN (
      SELECT
        mission_id
      FROM touched
    )
), missions_with_applications AS (
  SELECT
    missions.mission_id,
    missions.mission_title,
    missions.domain,
    missions.department,
    missions.mission_status,
    missions.places,
    missions.start_date,
    missions.organization_id,
    organizations.organization_name,
    organizations.organization_kind,
    COALESCE(mission_applications.applications_total, 0) AS applications_total,
    COALESCE(mission_applications.applications_accepted, 0) AS applications_accepted,
    COALESCE(mission_applications.applications_pending, 0) AS applications_pending,
    missions.created_at,
    missions.updated_at AS last_updated_at
  FROM missions
  LEFT JOIN organizations
    ON missions.organization_id = organizations.organization_id
  LEFT JOIN mission_applications
    ON missions.mission_id = mission_applications.mission_id
), gone AS (
  /* touched missions that no longer exist: rows with an empty mission_status, deleted by the statement after the
     query (never on a first build) */
  SELECT
    mission_id
  FROM touched
  WHERE
    NOT mission_id IN (
      SELECT
        mission_id
      FROM missions
    )
    AND NOT @first_build()
), changes AS (
  SELECT
    *
  FROM missions_with_applications
  UNION ALL
  SELECT
    mission_id,
    NULL AS mission_title,
    NULL AS domain,
    NULL AS department,
    NULL AS mission_status,
    NULL AS places,
    NULL AS start_date,
    NULL AS organization_id,
    NULL AS organization_name,
    NULL AS organization_kind,
    NULL AS applications_total,
    NULL AS applications_accepted,
    NULL AS applications_pending,
    NULL AS created_at,
    NULL AS last_updated_at
  FROM gone
)
SELECT
  mission_id,
  mission_title,
  domain,
  department,
  mission_status,
  places,
  start_date,
  organization_id,
  organization_name,
  organization_kind,
  applications_total,
  applications_accepted,
  applications_pending,
  created_at,
  last_updated_at
FROM changes;

/* the touched missions that no longer exist (see the top of this file) */
DELETE FROM @this_model
WHERE
  mission_status IS NULL