MODEL (
  name staging.stg_app_db__organizations,
  kind VIEW,
  grain organization_id,
  audits (
    not_null(
      columns := (organization_id, organization_name, organization_kind, created_at, updated_at)
    ),
    unique_values(columns := (
      organization_id
    )),
    accepted_values("column" := organization_kind, is_in := ('association', 'public_body', 'company'))
  ),
  description 'Live organizations of the application database: one row per organization that is not soft-deleted, renamed and cleaned.',
  column_descriptions (
    organization_id = 'Identifier of the organization in the application database.',
    organization_name = 'Name of the organization, trimmed.',
    organization_kind = 'Kind of organization: association, public_body or company.',
    department = 'INSEE code of the department of the organization (75, 2A, 971…).',
    created_at = 'When the organization was created (UTC).',
    updated_at = 'When the organization last changed (UTC).'
  )
);

WITH source AS (
  SELECT
    id,
    name,
    kind,
    department,
    created_at,
    updated_at,
    deleted_at
  FROM raw_app_db.organizations
), cleaned AS (
  SELECT
    id::BIGINT AS organization_id,
    TRIM(name) AS organization_name,
    LOWER(TRIM(kind)) AS organization_kind,
    UPPER(TRIM(department)) AS department,
    created_at AS created_at,
    updated_at AS updated_at
  FROM source
  WHERE
    deleted_at IS NULL
)
SELECT
  organization_id,
  organization_name,
  organization_kind,
  department,
  created_at::TIMESTAMP AS created_at,
  updated_at::TIMESTAMP AS updated_at
FROM cleaned