MODEL (
  name staging.stg_app_db__applications,
  kind VIEW,
  grain application_id,
  audits (
    not_null(
      columns := (application_id, mission_id, volunteer_id, application_status, created_at)
    ),
    unique_values(columns := (
      application_id
    )),
    accepted_values(
      "column" := application_status,
      is_in := ('pending', 'accepted', 'refused', 'cancelled')
    )
  ),
  description 'Applications of volunteers to missions, one row per application still present in the source (withdrawn applications are hard-deleted there).',
  column_descriptions (
    application_id = 'Identifier of the application in the application database.',
    mission_id = 'Mission applied to.',
    volunteer_id = 'Volunteer who applied (a technical key, used for joins only).',
    application_status = 'Status of the application: pending, accepted, refused or cancelled.',
    created_at = 'When the volunteer applied (UTC).',
    updated_at = 'When the application last changed (UTC).'
  )
);

WITH source AS (
  SELECT
    id,
    mission_id,
    volunteer_id,
    status,
    created_at,
    updated_at
  FROM raw_app_db.applications
), cleaned AS (
  SELECT
    id::BIGINT AS application_id,
    mission_id::BIGINT AS mission_id,
    volunteer_id::BIGINT AS volunteer_id,
    LOWER(TRIM(status)) AS application_status,
    created_at AS created_at,
    updated_at AS updated_at
  FROM source
)
SELECT
  application_id,
  mission_id,
  volunteer_id,
  application_status,
  created_at::TIMESTAMP AS created_at,
  updated_at::TIMESTAMP AS updated_at
FROM cleaned