"""Benchmark and results scripts. A package so that `python -m benchmarks.accuracy_table` runs from the
repository root; the other scripts run as files (`python benchmarks/x.py`) and import each other by name."""
