"""Privacy guarantees: lineage of personal columns to the published marts, erasure checks, the processing register."""
