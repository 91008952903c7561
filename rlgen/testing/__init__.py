"""Builders of tiny random-weight models in real Hub layouts, for tests and benchmarks (no downloads)."""
