"""Benchmarks run as `python -m benchmarks.NAME`: what each mode costs (bench), what the loader delivers (bench_loader)."""
