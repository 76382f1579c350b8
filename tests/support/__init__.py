"""Helpers the tests and the benchmarks share: tiny models and tasks, basin runs, fault
scenarios."""
