/* Kind FULL: the small-cell suppression merges every group of fewer than 5 volunteers into one "other" row, and
   hides that row while it is still too small, so any volunteer's change can move a row in or out of "other": the
   groups cannot be recomputed one at a time. Its output is small (departments x decades); the cost is reading the
   volunteers and their applications once. */
MODEL (
  name marts.volunteer_activity_v1,
  kind FULL,
  grain (department, birth_decade),
  tags (
    'personal:birth_decade'
  ),
  audits (
    not_null(columns := (department, volunteers, volunteers_who_applied, applications)),
    unique_combination_of_columns(columns := (department, birth_decade)),
    accepted_range("column" := volunteers, min_v := 1),
    forall(
      criteria := (volunteers_who_applied <= volunteers, applications >= volunteers_who_applied)
    ),
    assert_no_personal_columns,
    assert_no_small_cells(people := volunteers)
  ),
  description 'How many volunteers there are and how active they are, one row per department and decade of birth. Only counts: no one can be identified from it. To protect privacy, a group of fewer than 5 volunteers is never shown on its own: all such groups are added together in one row whose department is "other" (and decade empty), and that row is left out too when it still counts fewer than 5 volunteers. So a small department may be missing from the list, and totals include the "other" row. Answers: where do our volunteers live, and how old are they? Which share of them applied to at least one mission? How many applications does each age group send?',
  column_descriptions (
    department = 'Department code where the volunteers live (75 = Paris, 2A = Corse-du-Sud, 971 = Guadeloupe…); "other" for the groups of fewer than 5 volunteers, added together.',
    birth_decade = 'Decade of birth: 1980 means born between 1980 and 1989; empty when unknown, and in the "other" row.',
    volunteers = 'Volunteers signed up on the platform (always 5 or more: smaller groups are in the "other" row).',
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
), small_groups_merged AS (
  /* Groups of fewer than @small_cell_threshold() volunteers go to one "other" group (macros/privacy.py). */
  SELECT
    @merge_small_cell(volunteers, department, 'other') AS department,
    @merge_small_cell(volunteers, birth_decade, NULL) AS birth_decade,
    volunteers,
    volunteers_who_applied,
    applications
  FROM activity_per_group
), activity_per_shown_group AS (
  /* The "other" group itself is left out while it is still too small. */
  SELECT
    department,
    birth_decade,
    SUM(volunteers) AS volunteers,
    SUM(volunteers_who_applied) AS volunteers_who_applied,
    SUM(applications) AS applications
  FROM small_groups_merged
  GROUP BY
    department,
    birth_decade
  HAVING
    SUM(volunteers) >= @small_cell_threshold()
)
SELECT
  department,
  birth_decade,
  volunteers::BIGINT AS volunteers,
  volunteers_who_applied::BIGINT AS volunteers_who_applied,
  applications::BIGINT AS applications
FROM activity_per_shown_group