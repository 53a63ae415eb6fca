/* Kind FULL, on purpose for now: a mission's counts change when one of its applications is hard-deleted (withdrawn)
   or its organization is soft-deleted, and a deletion leaves no row in the raw tables to tell which missions it
   touched (dlt removes the row; ops.pipeline_run_tables keeps only a count). An INCREMENTAL_BY_UNIQUE_KEY version
   needs the deleted keys recorded with their load id first; see docs/known-limits.md. */
MODEL (
  name marts.missions_v1,
  kind FULL,
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

WITH missions AS (
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
FROM missions_with_applications