"""The reference workload programs (postcopy workload)."""
