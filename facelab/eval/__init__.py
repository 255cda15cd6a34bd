"""Metrics, benchmarks and reports (issue #6)."""
