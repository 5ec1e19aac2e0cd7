"""The miniature MLLM merging benchmark (OptMerge's benchmark at laptop size, offline, on the CPU).

A tiny ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama text model, word-level fast tokenizer,
``LlavaProcessor``), five procedural capability tasks (VQA, Geometry, Chart, OCR, Grounding), a zoo of experts
(full fine-tuning and LoRA) and the bench that merges them with every registered method.

This package depends on omnimerge's core; the core never imports it. Heavy imports (torch, transformers, peft)
happen inside the bench modules only.
"""

from __future__ import annotations

__all__ = ["TASKS"]

TASKS: tuple[str, ...] = ("vqa", "geometry", "chart", "ocr", "grounding")
