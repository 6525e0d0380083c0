"""`approxdist-bench`: compute, kernel and communication benchmarks (not tests)."""
