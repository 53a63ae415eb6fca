"""Privacy guarantees: erasure checks and the processing register, read from the gate's lineage of personal columns."""
