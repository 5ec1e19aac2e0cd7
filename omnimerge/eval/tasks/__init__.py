"""The pool's tasks, one module per dataset family; importing this package registers them all."""

from omnimerge.eval.tasks import chart, grounding, math, ocr, vqa  # noqa: F401
