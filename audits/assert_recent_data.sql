AUDIT (
  name assert_recent_data,
  defaults (max_age_days = 1, only_if_in_interval = FALSE)
);

/*
  Fails when the audited model lags behind the data loaded from its source: the latest day of `column` in the model
  is more than `max_age_days` days older than the latest day of `reference_column` in `reference_table` (a raw table
  loaded by dlt), or the model is empty while the source is not. Relative to the source and not to the wall clock on
  purpose: the demo source has its own calendar, and a source that stops for a holiday is not an error of the
  datamart; what this catches is a model not rebuilt after a load, or one that dropped the latest rows (a stalled
  extraction is reported by the pipelines). Timestamps with time zone are cut into days in the session time zone: a
  few hours at most, irrelevant at a tolerance counted in days. On an INCREMENTAL_BY_TIME_RANGE model SQLMesh
  narrows @this_model to the interval just processed: set only_if_in_interval := TRUE there, so that the check
  applies only to runs whose interval contains the latest source day (a backfill or a restatement up to now).
*/
WITH model_latest AS (
  SELECT
    MAX(@column::DATE) AS latest_day
  FROM @this_model
), reference_latest AS (
  SELECT
    MAX(@reference_column::DATE) AS latest_day
  FROM @reference_table
)
SELECT
  model_latest.latest_day AS latest_day_in_model,
  reference_latest.latest_day AS latest_day_in_source
FROM model_latest
CROSS JOIN reference_latest
WHERE
  NOT reference_latest.latest_day IS NULL
  AND (
    model_latest.latest_day IS NULL
    OR model_latest.latest_day + @max_age_days < reference_latest.latest_day
  )
  AND @within_processed_interval(reference_latest.latest_day, @only_if_in_interval)