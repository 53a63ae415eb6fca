MODEL (
  name marts.mission_status_history_v1,
  kind FULL,
  grain (mission_id, period_number),
  audits (
    not_null(
      columns := (
        mission_id,
        period_number,
        mission_status,
        valid_from,
        status_changed_at,
        is_current
      )
    ),
    unique_combination_of_columns(columns := (mission_id, period_number)),
    accepted_values("column" := mission_status, is_in := ('draft', 'published', 'closed')),
    accepted_range("column" := period_number, min_v := 1),
    forall(criteria := (
      valid_to IS NULL OR valid_to > valid_from
    )),
    assert_no_personal_columns
  ),
  description 'The statuses each mission went through, one row per mission and status period: from when to when the mission was in that status, as the datamart knows it: when a load saw the change (or, for an application database read by replication, when the application made it). Deleted missions keep their past periods, the last one closed by the deletion. Answers: how long do missions stay in draft before being published? How many missions were published on a given day in the past? Which missions were closed then published again? How many status changes happen per week?',
  column_descriptions (
    mission_id = 'Number of the mission in the platform.',
    period_number = 'Order of the period among the mission''s periods: 1 for the first status seen.',
    mission_status = 'Status during the period: draft (not visible yet), published (open to volunteers) or closed.',
    status_changed_at = 'When the mission took this status in the platform (UTC).',
    valid_from = 'When the mission entered this status (UTC): when a load first saw it, or the time the application made the change (replication): start of the period.',
    valid_to = 'When the status changed or the mission was deleted (UTC), seen the same way: end of the period; empty while it lasts.',
    is_current = 'True for the status the mission has today (false for past periods and deleted missions).'
  )
);

WITH versions AS (
  SELECT
    mission_id,
    mission_status,
    updated_at,
    valid_from,
    valid_to,
    LAG(mission_status) OVER (PARTITION BY mission_id ORDER BY valid_from) AS previous_status,
    LAG(valid_to) OVER (PARTITION BY mission_id ORDER BY valid_from) AS previous_valid_to
  FROM staging.stg_app_db__mission_versions
), numbered AS (
  SELECT
    mission_id,
    mission_status,
    updated_at,
    valid_from,
    valid_to,
    SUM(
      CASE
        WHEN previous_status IS DISTINCT FROM mission_status
        OR previous_valid_to IS DISTINCT FROM valid_from
        THEN 1
        ELSE 0
      END
    ) OVER (
      PARTITION BY mission_id
      ORDER BY valid_from
      ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
    ) AS period_number
  FROM versions
), periods AS (
  SELECT
    mission_id,
    period_number,
    MIN(mission_status) AS mission_status,
    MIN(updated_at) AS status_changed_at,
    MIN(valid_from) AS valid_from,
    CASE WHEN COUNT(valid_to) = COUNT(*) THEN MAX(valid_to) END AS valid_to
  FROM numbered
  GROUP BY
    mission_id,
    period_number
)
SELECT
  mission_id::BIGINT AS mission_id,
  period_number::BIGINT AS period_number,
  mission_status::TEXT AS mission_status,
  status_changed_at::TIMESTAMP AS status_changed_at,
  valid_from::TIMESTAMP AS valid_from,
  valid_to::TIMESTAMP AS valid_to,
  (
    valid_to IS NULL
  )::BOOLEAN AS is_current
FROM periods