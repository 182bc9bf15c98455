"""The benchmarks of the router on the local stack: ``python -m scripts.bench --help``."""
