"""Generated code (do not edit: each module names its generator; CI fails when one is stale against it)."""
