"""The selftest harness and its cases (shared with tests and benchmarks)."""
