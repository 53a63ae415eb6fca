MODEL (
  name staging.stg_app_db__stats_events,
  kind VIEW,
  grain event_id,
  audits (
    not_null(columns := (event_id, event_type, partner_id, occurred_at)),
    unique_combination_of_columns(columns := (
      event_id
    )),
    accepted_values("column" := event_type, is_in := ('impression', 'click', 'application'))
  ),
  description 'Partner traffic events (a mission shown, clicked or applied to from a partner site), one row per event. A view over the append-only raw table: the incremental work happens in the mart that aggregates it.',
  column_descriptions (
    event_id = 'Identifier of the event; grows with occurred_at.',
    event_type = 'What happened: impression (shown), click or application.',
    partner_id = 'Partner site where it happened.',
    mission_id = 'Mission concerned.',
    occurred_at = 'When it happened (UTC).',
    event_date = 'Day it happened (UTC).'
  )
);

WITH source AS (
  SELECT
    id,
    event_type,
    partner_id,
    mission_id,
    occurred_at
  FROM raw_app_db.stats_events
), cleaned AS (
  SELECT
    id::BIGINT AS event_id,
    LOWER(TRIM(event_type)) AS event_type,
    partner_id::BIGINT AS partner_id,
    mission_id::BIGINT AS mission_id,
    occurred_at AS occurred_at
  FROM source
)
SELECT
  event_id,
  event_type,
  partner_id,
  mission_id,
  occurred_at::TIMESTAMP AS occurred_at,
  occurred_at::DATE AS event_date
FROM cleaned