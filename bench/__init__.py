"""Performance benchmarks for the targets of DESIGN section 9 (`make bench`)."""
