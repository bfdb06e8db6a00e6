"""Benchmarks of the platform's hot paths (BENCHMARKS.md): one script per path, shared machinery in
`benchmarks.common`. Each script is `python -m benchmarks.bench_<name> --help`; each exposes
`main(argv) -> dict` so tests run it at tiny size."""
