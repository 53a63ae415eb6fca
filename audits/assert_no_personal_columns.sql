AUDIT (
  name assert_no_personal_columns,
  defaults (
    patterns = (
      '%email%',
      '%first_name%',
      '%firstname%',
      '%last_name%',
      '%lastname%',
      '%phone%',
      '%birth_date%',
      '%birthdate%',
      '%postcode%',
      '%postal_code%',
      '%zip_code%',
      '%address%',
      '%pseudonym%'
    )
  )
);

/*
  Fails when the audited model has a column whose name looks like personal data (email, names, phone, birth date,
  postcode, address, pseudonym): put it on every published model, Metabase users must never see such a column, even
  a pseudonymised one. It reads the real columns of the table just built from information_schema.columns (same shape
  in DuckDB and PostgreSQL), so a column added later is caught too; each row returned is one offending column.
  Usage: assert_no_personal_columns, or assert_no_personal_columns(patterns := ('%email%', '%nir%')) for another
  list of LIKE patterns.
*/
SELECT
  table_schema,
  table_name,
  column_name
FROM @information_schema_columns()
WHERE
  @is_audited_table(@this_model)
  AND (
    @REDUCE(@EACH(@patterns, p -> LOWER(column_name) LIKE p), (l, r) -> l OR r)
  )