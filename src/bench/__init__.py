"""Benchmark commands: each measures on the current machine and writes numbers into reports/."""
