"""Benchmarks of the rlhf_fast ops: ``python -m benchmarks.bench_<op>`` from the repository root."""
