MODEL (
  name staging.stg_bucket__partner_reports,
  kind VIEW,
  grain (report_date, partner_id),
  audits (
    not_null(columns := (report_date, partner_id)),
    unique_combination_of_columns(columns := (report_date, partner_id)),
    accepted_range("column" := reported_impressions, min_v := 0),
    accepted_range("column" := reported_clicks, min_v := 0),
    accepted_range("column" := reported_applications, min_v := 0)
  ),
  description 'What each partner reports it showed and sent us, one row per partner and day (one dump file per day).',
  column_descriptions (
    report_date = 'Day the report covers.',
    partner_id = 'Partner sending the report.',
    reported_impressions = 'Number of times the partner says it showed our missions that day.',
    reported_clicks = 'Number of clicks the partner says it sent us that day.',
    reported_applications = 'Number of applications the partner says it sent us that day.'
  )
);

WITH source AS (
  SELECT
    report_date,
    partner_id,
    impressions,
    clicks,
    applications
  FROM raw_bucket.partner_reports
), cleaned AS (
  SELECT
    report_date::DATE AS report_date,
    partner_id::BIGINT AS partner_id,
    impressions::BIGINT AS reported_impressions,
    clicks::BIGINT AS reported_clicks,
    applications::BIGINT AS reported_applications
  FROM source
)
SELECT
  report_date,
  partner_id,
  reported_impressions,
  reported_clicks,
  reported_applications
FROM cleaned