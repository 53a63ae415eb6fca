MODEL (
  name staging.stg_app_db__missions,
  kind VIEW,
  grain mission_id,
  audits (
    not_null(columns := (mission_id, organization_id, mission_status, created_at, updated_at)),
    unique_values(columns := (
      mission_id
    )),
    accepted_values("column" := mission_status, is_in := ('draft', 'published', 'closed')),
    accepted_values(
      "column" := domain,
      is_in := ('environment', 'education', 'health', 'solidarity', 'culture', 'sport')
    ),
    accepted_range("column" := places, min_v := 0)
  ),
  description 'Live missions of the application database: one row per mission that is not soft-deleted (its current version: raw_app_db.missions keeps every version, see stg_app_db__mission_versions), renamed and cleaned.',
  column_descriptions (
    mission_id = 'Identifier of the mission in the application database.',
    organization_id = 'Organization publishing the mission.',
    mission_title = 'Title of the mission, trimmed.',
    domain = 'Domain of the mission: environment, education, health, solidarity, culture or sport.',
    department = 'INSEE code of the department where the mission takes place.',
    places = 'Number of volunteers sought.',
    mission_status = 'Status of the mission: draft, published or closed.',
    start_date = 'Day the mission starts.',
    created_at = 'When the mission was created (UTC).',
    updated_at = 'When the mission last changed (UTC).'
  )
);

WITH source AS (
  SELECT
    id,
    organization_id,
    title,
    domain,
    department,
    places,
    status,
    start_date,
    created_at,
    updated_at,
    deleted_at,
    _dlt_valid_to
  FROM raw_app_db.missions
), cleaned AS (
  SELECT
    id::BIGINT AS mission_id,
    organization_id::BIGINT AS organization_id,
    TRIM(title) AS mission_title,
    LOWER(TRIM(domain)) AS domain,
    UPPER(TRIM(department)) AS department,
    places::BIGINT AS places,
    LOWER(TRIM(status)) AS mission_status,
    start_date::DATE AS start_date,
    created_at AS created_at,
    updated_at AS updated_at
  FROM source
  WHERE
    deleted_at IS NULL AND _dlt_valid_to IS NULL
)
SELECT
  mission_id,
  organization_id,
  mission_title,
  domain,
  department,
  places,
  mission_status,
  start_date,
  created_at::TIMESTAMP AS created_at,
  updated_at::TIMESTAMP AS updated_at
FROM cleaned