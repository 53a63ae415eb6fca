MODEL (
  name marts.volunteer_activity_v1,
  kind FULL,
  grain (department, birth_decade),
  audits (
    not_null(columns := (department, volunteers, volunteers_who_applied, applications)),
    unique_combination_of_columns(columns := (department, birth_decade)),
    accepted_range("column" := volunteers, min_v := 1),
    forall(
      criteria := (volunteers_who_applied <= volunteers, applications >= volunteers_who_applied)
    ),
    assert_no_personal_columns
  ),
  description 'How many volunteers there are and how active they are, one row per department and decade of birth. Only counts: no one can be identified from it. Answers: where do our volunteers live, and how old are they? Which share of them applied to at least one mission? How many applications does each age group send?',
  column_descriptions (
    department = 'Department code where the volunteers live (75 = Paris, 2A = Corse-du-Sud, 971 = Guadeloupe…).',
    birth_decade = 'Decade of birth: 1980 means born between 1980 and 1989; empty when unknown.',
    volunteers = 'Volunteers signed up on the platform.',
    volunteers_who_applied = 'Among them, volunteers who applied to at least one mission.',
    applications = 'Applications sent by these volunteers, whatever the answer.'
  )
);

WITH volunteer_applications AS (
  SELECT
    volunteer_id,
    department,
    birth_decade,
    applications
  FROM intermediate.int_volunteer_applications
), activity_per_group AS (
  SELECT
    department,
    birth_decade,
    COUNT(*) AS volunteers,
    COUNT(*) FILTER(WHERE
      applications > 0) AS volunteers_who_applied,
    SUM(applications) AS applications
  FROM volunteer_applications
  GROUP BY
    department,
    birth_decade
)
SELECT
  department,
  birth_decade,
  volunteers,
  volunteers_who_applied,
  applications::BIGINT AS applications
FROM activity_per_group