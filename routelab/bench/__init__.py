"""Benchmark harnesses (timed as ratios against references measured in the same run)."""
