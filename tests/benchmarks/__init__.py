"""Benchmark scripts (run by hand, not collected by pytest) and the tiny builders they share."""
