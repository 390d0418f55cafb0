"""Benchmarks of vggt-fsdp recipes: step time, throughput, MFU and peak memory, and their report.

Run from the repository root: `python -m benchmarks.bench_step RECIPE ...` measures one configuration,
`python -m benchmarks.compare_recipes ...` compares the recipes and writes the report.
"""
