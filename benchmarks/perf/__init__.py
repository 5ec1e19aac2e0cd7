"""Performance harness: synthetic Qwen2-shaped checkpoints, omnimerge vs mergekit vs the page-cache read limit.

Run ``python -m benchmarks.perf.run --help`` from the repository root.
"""
