AUDIT (
  name assert_no_small_cells
);

/*
  Fails when a row of the audited aggregate describes fewer people than the small-cell threshold (the SQLMesh
  variable small_cell_threshold, default 5): a group that small can single a person out. Put it on every published
  model that counts people (volunteers, applicants) per group of their attributes, with the column counting the
  people of each row: assert_no_small_cells(people := volunteers). The model merges such groups with the macro
  @merge_small_cell (macros/privacy.py); this audit proves it did, on the data just built.
*/
SELECT
  *
FROM @this_model
WHERE
  @people < @small_cell_threshold()