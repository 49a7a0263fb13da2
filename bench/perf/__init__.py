"""Performance scripts (GPU benchmarks) that write committed reference results."""
