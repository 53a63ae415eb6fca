MODEL (
  name intermediate.int_mission_applications,
  kind VIEW,
  grain mission_id,
  audits (
    not_null(
      columns := (
        mission_id,
        organization_id,
        applications_total,
        applications_accepted,
        applications_pending
      )
    ),
    unique_values(columns := (
      mission_id
    )),
    forall(
      criteria := (
        applications_total = applications_accepted + applications_pending + applications_refused + applications_cancelled
      )
    )
  ),
  description 'Applications per live mission, counted by status: one row per mission that is not soft-deleted, zero when nobody applied.',
  column_descriptions (
    mission_id = 'Live mission.',
    organization_id = 'Organization publishing the mission.',
    mission_status = 'Status of the mission: draft, published or closed.',
    applications_total = 'Applications to the mission, whatever their status.',
    applications_accepted = 'Applications accepted by the organization.',
    applications_pending = 'Applications waiting for an answer.',
    applications_refused = 'Applications refused by the organization.',
    applications_cancelled = 'Applications cancelled.'
  )
);

WITH missions AS (
  SELECT
    mission_id,
    organization_id,
    mission_status
  FROM staging.stg_app_db__missions
), applications AS (
  SELECT
    mission_id,
    application_status
  FROM staging.stg_app_db__applications
), counts_per_mission AS (
  SELECT
    mission_id,
    COUNT(*) AS applications_total,
    COUNT(*) FILTER(WHERE
      application_status = 'accepted') AS applications_accepted,
    COUNT(*) FILTER(WHERE
      application_status = 'pending') AS applications_pending,
    COUNT(*) FILTER(WHERE
      application_status = 'refused') AS applications_refused,
    COUNT(*) FILTER(WHERE
      application_status = 'cancelled') AS applications_cancelled
  FROM applications
  GROUP BY
    mission_id
)
SELECT
  missions.mission_id,
  missions.organization_id,
  missions.mission_status,
  COALESCE(counts_per_mission.applications_total, 0) AS applications_total,
  COALESCE(counts_per_mission.applications_accepted, 0) AS applications_accepted,
  COALESCE(counts_per_mission.applications_pending, 0) AS applications_pending,
  COALESCE(counts_per_mission.applications_refused, 0) AS applications_refused,
  COALESCE(counts_per_mission.applications_cancelled, 0) AS applications_cancelled
FROM missions
LEFT JOIN counts_per_mission
  ON missions.mission_id = counts_per_mission.mission_id