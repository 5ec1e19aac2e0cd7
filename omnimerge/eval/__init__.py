"""Evaluation of (merged) MLLMs on real benchmarks: a task pool (one module per dataset family), model backends
that generate answers, and scoring. :mod:`omnimerge.eval.protocol` is the contract between them."""
