MODEL (
  name staging.stg_app_db__volunteers,
  kind VIEW,
  grain volunteer_id,
  audits (
    not_null(columns := (volunteer_id, department, created_at)),
    unique_values(columns := (
      volunteer_id
    )),
    accepted_range("column" := birth_year, min_v := 1900, max_v := 2030)
  ),
  description 'Volunteers of the application database, one row per volunteer, reduced to what analyses need: no contact or identity data. The email pseudonym loaded by dlt is deliberately not carried over: no model needs it.',
  column_descriptions (
    volunteer_id = 'Identifier of the volunteer in the application database (a technical key, used for joins only).',
    birth_year = 'Year of birth (the source birth date is coarsened to its year at extraction); null when implausible.',
    department = 'INSEE code of the department of the volunteer.',
    created_at = 'When the volunteer signed up (UTC).',
    updated_at = 'When the volunteer last changed (UTC).'
  )
);

WITH source AS (
  SELECT
    id,
    birth_year,
    department,
    created_at,
    updated_at
  FROM raw_app_db.volunteers
), cleaned AS (
  SELECT
    id::BIGINT AS volunteer_id,
    CASE WHEN birth_year BETWEEN 1900 AND 2030 THEN birth_year::BIGINT END AS birth_year,
    UPPER(TRIM(department)) AS department,
    created_at AS created_at,
    updated_at AS updated_at
  FROM source
)
SELECT
  volunteer_id,
  birth_year,
  department,
  created_at::TIMESTAMP AS created_at,
  updated_at::TIMESTAMP AS updated_at
FROM cleaned