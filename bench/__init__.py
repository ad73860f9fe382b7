"""nsmail benchmarks; run through `scripts/bench`."""
