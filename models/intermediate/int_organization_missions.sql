MODEL (
  name intermediate.int_organization_missions,
  kind VIEW,
  grain organization_id,
  audits (
    not_null(columns := (organization_id, live_missions, published_missions, applications)),
    unique_values(columns := (
      organization_id
    )),
    forall(criteria := (
      published_missions <= live_missions
    ))
  ),
  description 'Missions and applications per live organization: one row per organization that is not soft-deleted, zero when it has no live mission.',
  column_descriptions (
    organization_id = 'Live organization.',
    live_missions = 'Missions of the organization that are not deleted, whatever their status.',
    published_missions = 'Missions of the organization currently published.',
    applications = 'Applications to the live missions of the organization, whatever their status.'
  )
);

WITH organizations AS (
  SELECT
    organization_id
  FROM staging.stg_app_db__organizations
), mission_applications AS (
  SELECT
    organization_id,
    mission_status,
    applications_total
  FROM intermediate.int_mission_applications
), counts_per_organization AS (
  SELECT
    organization_id,
    COUNT(*) AS live_missions,
    COUNT(*) FILTER(WHERE
      mission_status = 'published') AS published_missions,
    SUM(applications_total) AS applications
  FROM mission_applications
  GROUP BY
    organization_id
)
SELECT
  organizations.organization_id,
  COALESCE(counts_per_organization.live_missions, 0) AS live_missions,
  COALESCE(counts_per_organization.published_missions, 0) AS published_missions,
  COALESCE(counts_per_organization.applications, 0)::BIGINT AS applications
FROM organizations
LEFT JOIN counts_per_organization
  ON organizations.organization_id = counts_per_organization.organization_id