MODEL (
  name intermediate.int_volunteer_applications,
  kind VIEW,
  grain volunteer_id,
  audits (
    not_null(columns := (volunteer_id, department, applications)),
    unique_values(columns := (
      volunteer_id
    )),
    accepted_range("column" := applications, min_v := 0)
  ),
  description 'Applications per volunteer, with the volunteer reduced to department and birth decade: one row per volunteer, the step before anonymous aggregates.',
  column_descriptions (
    volunteer_id = 'Volunteer (a technical key; never published).',
    department = 'INSEE code of the department of the volunteer.',
    birth_decade = 'Decade of birth (1980 for 1980–1989); null when the birth year is unknown.',
    applications = 'Applications of the volunteer, whatever their status or mission.'
  )
);

WITH volunteers AS (
  SELECT
    volunteer_id,
    department,
    birth_year
  FROM staging.stg_app_db__volunteers
), applications AS (
  SELECT
    volunteer_id
  FROM staging.stg_app_db__applications
), counts_per_volunteer AS (
  SELECT
    volunteer_id,
    COUNT(*) AS applications
  FROM applications
  GROUP BY
    volunteer_id
)
SELECT
  volunteers.volunteer_id,
  volunteers.department,
  volunteers.birth_year - volunteers.birth_year % 10 AS birth_decade,
  COALESCE(counts_per_volunteer.applications, 0) AS applications
FROM volunteers
LEFT JOIN counts_per_volunteer
  ON volunteers.volunteer_id = counts_per_volunteer.volunteer_id