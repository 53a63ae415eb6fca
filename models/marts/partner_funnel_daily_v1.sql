MODEL (
  name marts.partner_funnel_daily_v1,
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column event_date,
    lookback 2
  ),
  grain (partner_id, event_date),
  audits (
    not_null(columns := (partner_id, event_date, impressions, clicks, applications)),
    unique_combination_of_columns(columns := (partner_id, event_date)),
    accepted_range("column" := impressions, min_v := 0),
    accepted_range("column" := click_rate, min_v := 0),
    accepted_range("column" := application_rate, min_v := 0),
    assert_no_personal_columns,
    assert_recent_data(
      "column" := event_date,
      reference_table := raw_app_db.stats_events,
      reference_column := occurred_at,
      max_age_days := 1,
      only_if_in_interval := TRUE
    )
  ),
  description 'What partner sites did for our missions, one row per partner and day: how many times they showed a mission, how many visitors clicked through, how many applied, and what the partner itself reports for that day. Answers: which partners bring the most applications? How do click and application rates evolve? Do the figures a partner reports match what we measured?',
  column_descriptions (
    partner_id = 'Number of the partner site.',
    partner_name = 'Name of the partner site (empty if the partner is not in the referential).',
    event_date = 'Day (UTC).',
    impressions = 'Times the partner showed one of our missions that day, as we measured it.',
    clicks = 'Visitors who clicked through to a mission that day, as we measured it.',
    applications = 'Applications sent from the partner site that day, as we measured it.',
    click_rate = 'Clicks divided by impressions (0.08 = 8 %); empty when there was no impression.',
    application_rate = 'Applications divided by clicks (0.1 = 10 %); empty when there was no click.',
    reported_impressions = 'Impressions the partner reports for that day; empty when it sent no report.',
    reported_clicks = 'Clicks the partner reports for that day; empty when it sent no report.',
    reported_applications = 'Applications the partner reports for that day; empty when it sent no report.'
  )
);

WITH events AS (
  SELECT
    partner_id,
    event_type,
    event_date
  FROM staging.stg_app_db__stats_events
  /* occurred_at is a UTC TIMESTAMP: compare it with the interval's bounds without time zone (@start_dt would be a
     TIMESTAMPTZ, compared in the session time zone on PostgreSQL). */
  WHERE
    occurred_at BETWEEN @start_dtntz AND @end_dtntz
), partners AS (
  SELECT
    partner_id,
    partner_name
  FROM staging.stg_bucket__partners
), reports AS (
  SELECT
    report_date,
    partner_id,
    reported_impressions,
    reported_clicks,
    reported_applications
  FROM staging.stg_bucket__partner_reports
  WHERE
    report_date BETWEEN @start_date AND @end_date
), measured_per_partner_day AS (
  SELECT
    partner_id,
    event_date,
    COUNT(*) FILTER(WHERE
      event_type = 'impression') AS impressions,
    COUNT(*) FILTER(WHERE
      event_type = 'click') AS clicks,
    COUNT(*) FILTER(WHERE
      event_type = 'application') AS applications
  FROM events
  GROUP BY
    partner_id,
    event_date
), measured_and_reported AS (
  /* A day a partner reports but we measured nothing is kept (with zero measured): it is a discrepancy to see. */
  SELECT
    COALESCE(measured_per_partner_day.partner_id, reports.partner_id) AS partner_id,
    COALESCE(measured_per_partner_day.event_date, reports.report_date) AS event_date,
    COALESCE(measured_per_partner_day.impressions, 0) AS impressions,
    COALESCE(measured_per_partner_day.clicks, 0) AS clicks,
    COALESCE(measured_per_partner_day.applications, 0) AS applications,
    reports.reported_impressions,
    reports.reported_clicks,
    reports.reported_applications
  FROM measured_per_partner_day
  FULL OUTER JOIN reports
    ON measured_per_partner_day.partner_id = reports.partner_id
    AND measured_per_partner_day.event_date = reports.report_date
)
SELECT
  measured_and_reported.partner_id,
  partners.partner_name,
  measured_and_reported.event_date,
  measured_and_reported.impressions,
  measured_and_reported.clicks,
  measured_and_reported.applications,
  measured_and_reported.clicks::DOUBLE / NULLIF(measured_and_reported.impressions, 0) AS click_rate,
  measured_and_reported.applications::DOUBLE / NULLIF(measured_and_reported.clicks, 0) AS application_rate,
  measured_and_reported.reported_impressions,
  measured_and_reported.reported_clicks,
  measured_and_reported.reported_applications
FROM measured_and_reported
LEFT JOIN partners
  ON measured_and_reported.partner_id = partners.partner_id