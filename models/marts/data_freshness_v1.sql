MODEL (
  name marts.data_freshness_v1,
  kind VIEW,
  grain (pipeline, table_name),
  audits (
    not_null(columns := (pipeline, dataset, table_name, last_success_at)),
    unique_combination_of_columns(columns := (pipeline, table_name)),
    accepted_values("column" := pipeline_last_run_status, is_in := ('running', 'succeeded', 'failed')),
    assert_no_personal_columns
  ),
  description 'How fresh the data is, one row per loaded table: when a pipeline last loaded it successfully and how long ago, how the last run of its pipeline went, and whether the published views already reflect that load. A view over the run records (schema ops), so the age is computed when it is read. Answers: is the data in the dashboards up to date? Which table has not been refreshed since yesterday? Did last night''s load fail? Do the dashboards show the data that was loaded? For replication pipelines: how much disk does the source keep for the pipeline''s slot?',
  column_descriptions (
    pipeline = 'Pipeline that loads the table (pipelines/<name>.yaml).',
    dataset = 'Warehouse schema the table is loaded into (raw_<source>).',
    table_name = 'Table loaded.',
    last_success_at = 'When a run of the pipeline last loaded this table successfully (UTC).',
    minutes_since_last_success = 'Minutes elapsed since then, when the view is read.',
    hours_since_last_success = 'Hours elapsed since then, when the view is read (one decimal).',
    rows_read_last_success = 'Rows read from the source by that run (0: nothing had changed).',
    rows_in_warehouse = 'Rows in the table after that run.',
    pipeline_last_run_at = 'When the latest run of the pipeline started, whatever its outcome (UTC).',
    pipeline_last_run_status = 'Outcome of that run: running, succeeded or failed.',
    published_views_refreshed_at = 'When the published views last took in new data (UTC): the start of the latest successful refresh (make run, make promote or the scheduled run). Every load that ended before it is in the dashboards.',
    last_success_published = 'Whether the dashboards already reflect this table''s last successful load (false: the data is loaded but the published views are behind it until the next refresh).',
    replication_slot = 'Replication pipelines only (changes: replication): the slot the pipeline reads on the source database; empty for other pipelines.',
    slot_retained_wal_bytes = 'Disk space (bytes) the source database keeps for that slot, measured at the end of the pipeline''s latest run: it grows until the pipeline reads the slot again, and a slot nobody reads fills the source''s disk.',
    slot_lag_bytes = 'Changes (bytes of the source''s log) written since the slot''s last confirmed position when measured: what the warehouse did not have yet.',
    slot_measured_at = 'When the slot was last measured (UTC).',
    slot_above_max_retained_wal = 'Whether the slot kept more than the pipeline''s source.max_retained_wal when measured: the scheduled run alerts on it.'
  )
);

WITH runs AS (
  SELECT
    pipeline,
    started_at,
    status
  FROM ops.pipeline_runs
), table_loads AS (
  SELECT
    pipeline,
    dataset,
    table_name,
    rows_read,
    rows_in_warehouse,
    ended_at
  FROM ops.pipeline_run_tables
), ranked_loads AS (
  SELECT
    pipeline,
    dataset,
    table_name,
    rows_read,
    rows_in_warehouse,
    ended_at,
    ROW_NUMBER() OVER (PARTITION BY pipeline, table_name ORDER BY ended_at DESC) AS recency
  FROM table_loads
), ranked_runs AS (
  SELECT
    pipeline,
    started_at,
    status,
    ROW_NUMBER() OVER (PARTITION BY pipeline ORDER BY started_at DESC) AS recency
  FROM runs
), refreshes AS (
  SELECT
    MAX(started_at) AS refreshed_at
  FROM ops.datamart_refreshes
  WHERE
    status = 'succeeded'
), slot_measurements AS (
  SELECT
    pipeline,
    slot_name,
    retained_wal_bytes,
    lag_bytes,
    max_retained_wal_bytes,
    measured_at
  FROM ops.replication_slots
), ranked_slots AS (
  SELECT
    pipeline,
    slot_name,
    retained_wal_bytes,
    lag_bytes,
    max_retained_wal_bytes,
    measured_at,
    ROW_NUMBER() OVER (PARTITION BY pipeline ORDER BY measured_at DESC) AS recency
  FROM slot_measurements
), freshness AS (
  SELECT
    ranked_loads.pipeline,
    ranked_loads.dataset,
    ranked_loads.table_name,
    ranked_loads.ended_at AS last_success_at,
    DATE_DIFF('MINUTE', ranked_loads.ended_at, CURRENT_TIMESTAMP) AS minutes_since_last_success,
    ranked_loads.rows_read AS rows_read_last_success,
    ranked_loads.rows_in_warehouse,
    ranked_runs.started_at AS pipeline_last_run_at,
    ranked_runs.status AS pipeline_last_run_status,
    refreshes.refreshed_at AS published_views_refreshed_at,
    ranked_slots.slot_name AS replication_slot,
    ranked_slots.retained_wal_bytes AS slot_retained_wal_bytes,
    ranked_slots.lag_bytes AS slot_lag_bytes,
    ranked_slots.measured_at AS slot_measured_at,
    ranked_slots.retained_wal_bytes > ranked_slots.max_retained_wal_bytes AS slot_above_max_retained_wal
  FROM ranked_loads
  LEFT JOIN ranked_runs
    ON ranked_runs.pipeline = ranked_loads.pipeline AND ranked_runs.recency = 1
  LEFT JOIN ranked_slots
    ON ranked_slots.pipeline = ranked_loads.pipeline AND ranked_slots.recency = 1
  CROSS JOIN refreshes
  WHERE
    ranked_loads.recency = 1
)
SELECT
  pipeline,
  dataset,
  table_name,
  last_success_at,
  minutes_since_last_success,
  ROUND(minutes_since_last_success / 60.0, 1) AS hours_since_last_success,
  rows_read_last_success,
  rows_in_warehouse,
  pipeline_last_run_at,
  pipeline_last_run_status,
  published_views_refreshed_at,
  COALESCE(last_success_at <= published_views_refreshed_at, FALSE) AS last_success_published,
  replication_slot,
  slot_retained_wal_bytes,
  slot_lag_bytes,
  slot_measured_at,
  slot_above_max_retained_wal
FROM freshness