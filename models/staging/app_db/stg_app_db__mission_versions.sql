MODEL (
  name staging.stg_app_db__mission_versions,
  kind VIEW,
  grain (mission_id, valid_from),
  audits (
    not_null(columns := (mission_id, mission_status, valid_from, updated_at)),
    unique_combination_of_columns(columns := (mission_id, valid_from)),
    accepted_values("column" := mission_status, is_in := ('draft', 'published', 'closed'))
  ),
  description 'Every version of every mission the warehouse has seen (raw_app_db.missions is declared with history: scd2): one row per mission and version, with when it started (the load that saw it, or its commit in the application when the source is read by replication) and when a later version or the deletion ended it.',
  column_descriptions (
    mission_id = 'Identifier of the mission in the application database.',
    mission_status = 'Status of the mission in this version: draft, published or closed.',
    places = 'Number of volunteers sought in this version.',
    updated_at = 'When the application changed the mission to this version (UTC).',
    valid_from = 'When this version started (UTC): the load that saw it, or its commit in the application (replication).',
    valid_to = 'When a later version replaced it or the mission was deleted (UTC), seen the same way; empty for the current version.'
  )
);

SELECT
  id::BIGINT AS mission_id,
  LOWER(TRIM(status)) AS mission_status,
  places::BIGINT AS places,
  updated_at::TIMESTAMP AS updated_at,
  _dlt_valid_from AT TIME ZONE 'UTC' AS valid_from,
  _dlt_valid_to AT TIME ZONE 'UTC' AS valid_to
FROM raw_app_db.missions
WHERE
  deleted_at IS NULL