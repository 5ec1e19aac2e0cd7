"""Calibration data for ``omnimerge stats`` from a JSONL file: one row per example, ``{"prompt": ...,
"images": [paths] (or "image": path), "answer": ... (optional)}``; image paths relative to the file's folder.

Each row is rendered with the expert's own chat template and processor as evaluation renders requests (the
images in the user turn, then the text; ``add_generation_prompt``), the answer appended after the generation
prompt; the answer tokens are the labels. A vision-language expert given rows without any image is refused
(its vision tower and projector would see no input); a text-only expert given images is refused too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from omnimerge.errors import OmniMergeError
from omnimerge.stats import Batch


def read_rows(path: Path, n: int | None = None, flag: str = "--calib") -> list[dict[str, Any]]:
    """The rows of a calibration JSONL (the first ``n``), each checked for a prompt; image paths resolved
    (``flag``: the option named in errors)."""
    from omnimerge.eval.data import DataError, read_jsonl_objects

    try:
        objects = read_jsonl_objects(path, limit=n)
    except DataError as e:
        raise OmniMergeError(f"{flag} {e}") from None
    rows = []
    for i, row in objects:
        if not isinstance(row.get("prompt"), str):
            raise OmniMergeError(f"{flag} {path}:{i}: expected an object with a 'prompt' string")
        imgs = row.get("images", [row["image"]] if "image" in row else [])
        if isinstance(imgs, str) or not all(isinstance(p, str) for p in imgs):
            raise OmniMergeError(f"{flag} {path}:{i}: 'images' must be a list of paths")
        row["images"] = [p if Path(p).is_absolute() else str(path.parent / p) for p in imgs]
        for p in row["images"]:
            if not Path(p).is_file():
                raise OmniMergeError(f"{flag} {path}:{i}: image {p} does not exist")
        rows.append(row)
    if not rows:
        raise OmniMergeError(f"{flag} {path}: no rows")
    return rows


def _is_vlm(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def jsonl_batches(path: Path, processor: Any, config: Any, *, n: int | None, batch_size: int,
                  what: str, prompts_only: bool = False, rows: list[dict[str, Any]] | None = None,
                  flag: str = "--calib") -> Iterator[Batch]:
    """Batches of the JSONL's rows for the expert (``what`` names it in errors); right padding. With
    ``prompts_only`` (test-time adaptation, ``omnimerge adamerge``): the rendered prompts alone, left padding (the
    last position is the answer position), no labels, any answers in the file never read. ``rows``: the rows
    already read by :func:`read_rows` (the data checked before the model loads)."""
    from PIL import Image

    rows = read_rows(path, n, flag) if rows is None else rows
    multimodal = getattr(processor, "image_processor", None) is not None
    has_images = any(r["images"] for r in rows)
    if _is_vlm(config) and not has_images:
        raise OmniMergeError(f"{flag} {path}: no row has an image, but {what} is a vision-language model "
                             f"({type(config).__name__}) whose vision tower and projector need image inputs")
    if has_images and not multimodal:
        raise OmniMergeError(f"{flag} {path}: rows have images, but {what} has no image processor (text-only)")
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left" if prompts_only else "right"
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        prompts, texts = [], []
        for r in chunk:
            if multimodal:
                content: Any = [{"type": "image"} for _ in r["images"]] + [{"type": "text", "text": r["prompt"]}]
            else:
                content = r["prompt"]
            p = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
            prompts.append(p)
            texts.append(p if prompts_only else p + str(r.get("answer", "")))
        bos = tok.bos_token
        special = {"add_special_tokens": False} if bos and all(t.startswith(bos) for t in texts) else {}
        if multimodal:
            images = [[Image.open(p).convert("RGB") for p in r["images"]] for r in chunk]
            arg: Any = images if all(images) else [im for ims in images for im in ims] or None
            enc = processor(text=texts, images=arg, return_tensors="pt", padding=True, **special)
        else:
            enc = tok(texts, return_tensors="pt", padding=True, **special)
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if prompts_only:
            yield Batch(inputs, None)
            continue
        if multimodal:
            plen = [int(x.sum()) for x in processor(text=prompts, images=arg, return_tensors="pt", padding=True,
                                                    **special)["attention_mask"]]
        else:
            plen = [int(x.sum()) for x in tok(prompts, return_tensors="pt", padding=True, **special)["attention_mask"]]
        labels = None
        if all("answer" in r for r in chunk):
            labels = torch.full_like(inputs["input_ids"], -100)
            mask = inputs["attention_mask"]
            for i, pl in enumerate(plen):
                end = int(mask[i].sum())
                labels[i, pl:end] = inputs["input_ids"][i, pl:end]
        yield Batch(inputs, labels)
