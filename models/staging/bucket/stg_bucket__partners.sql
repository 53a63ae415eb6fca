MODEL (
  name staging.stg_bucket__partners,
  kind VIEW,
  grain partner_id,
  audits (
    not_null(columns := (partner_id, partner_name, partner_kind, is_active)),
    unique_values(columns := (
      partner_id
    )),
    accepted_values("column" := partner_kind, is_in := ('api', 'widget', 'jobboard'))
  ),
  description 'The partner referential (partner sites showing our missions), one row per partner.',
  column_descriptions (
    partner_id = 'Identifier of the partner.',
    partner_name = 'Name of the partner, trimmed.',
    partner_kind = 'How the partner shows our missions: api, widget or jobboard.',
    is_active = 'Whether the partnership is active.'
  )
);

WITH source AS (
  SELECT
    partner_id,
    name,
    kind,
    active
  FROM raw_bucket.partners
), cleaned AS (
  SELECT
    partner_id::BIGINT AS partner_id,
    TRIM(name) AS partner_name,
    LOWER(TRIM(kind)) AS partner_kind,
    active::BOOLEAN AS is_active
  FROM source
)
SELECT
  partner_id,
  partner_name,
  partner_kind,
  is_active
FROM cleaned