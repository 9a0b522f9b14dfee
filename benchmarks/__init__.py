"""The performance suite: ``python -m benchmarks [--quick] [--json FILE]`` (not collected by pytest)."""
