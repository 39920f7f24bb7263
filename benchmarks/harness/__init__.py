"""The benchmark harness: environment, timing, memory, the run loop and the report. Op families live in
benchmarks/cases/."""
