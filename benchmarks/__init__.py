"""The gsa_kernels microbenchmark suite: `python -m benchmarks --help` (see benchmarks/NOTES.md)."""
