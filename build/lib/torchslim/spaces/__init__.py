"""Index spaces: channel atoms, per-dimension layouts and their algebra, sizes that remember
where they came from, and the trace's data record that the op rules fill (see
docs/architecture.md). Depends on torch and numpy only."""
