"""Model backends: answer :class:`~omnimerge.eval.protocol.Request` s with a loaded model.

:class:`TransformersBackend` (the default) renders each request through the model's own chat template (the
images in the user turn, then the text), runs the model's processor, and generates greedily in batches (left
padding; requests sorted by length so that a batch pads little; results returned in request order). On CPU it
runs in float32, on CUDA in bfloat16 (see :func:`omnimerge.eval.models.load_model`). The decoded text keeps the
special tokens a family writes boxes with (Qwen2-VL's ``<|box_start|>``, InternVL's ``<box>``) and drops
padding, BOS and everything from the first end-of-sequence token on.

Image sizes (:attr:`Generation.image_sizes`): Qwen2-VL/2.5-VL from ``image_grid_thw`` x the patch size (the
smart-resized image, which Qwen2.5-VL's pixel boxes refer to); other families: the processor's fixed target
size (center crop, or a ``height``/``width`` resize), else the original size (InternVL's tiling and LLaVA-NeXT's
any-resolution grids have no single resized size; their boxes are relative, so none is needed).

A vLLM backend is not part of this module yet."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnimerge.errors import OmniMergeError
from omnimerge.eval.models import LoadedModel, load_model
from omnimerge.eval.protocol import Generation, Request, box_format_for


def _messages(req: Request, multimodal: bool) -> list[dict[str, Any]]:
    if not multimodal:  # a text-only model's template takes the content as a string
        return [{"role": "user", "content": req.prompt}]
    content: list[dict[str, Any]] = [{"type": "image"} for _ in req.images]
    content.append({"type": "text", "text": req.prompt})
    return [{"role": "user", "content": content}]


def _progress_columns() -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Throughput(ProgressColumn):
        def render(self, task: Any) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            if not elapsed or not task.completed:
                return Text("? req/s")
            return Text(f"{task.completed / elapsed:.2f} req/s")

    return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Throughput(), TextColumn("ETA"),
            TimeRemainingColumn()]


class TransformersBackend:
    """Batched greedy generation with a transformers model (see the module docstring).

    ``batch_size``: requests per ``generate`` call; ``progress``: show a rich progress bar (throughput, ETA).
    After :meth:`generate`, ``last_stats`` holds the number of requests, the seconds taken and requests/s."""

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 8, progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        self.tokenizer.padding_side = "left"
        self.batch_size = batch_size
        self.progress = progress
        self.multimodal = getattr(loaded.processor, "image_processor", None) is not None
        self.box_format: str = box_format_for(loaded.model_type)
        self.last_stats: dict[str, float] = {}
        gen = self.model.generation_config
        # generation stops at the model's end tokens and at the tokenizer's (the end of a chat turn, e.g. a base
        # Qwen2-VL's generation config names only <|endoftext|> while its template ends turns with <|im_end|>)
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        self._eos = {*eos, self.tokenizer.eos_token_id} - {None}
        if not self._eos:
            raise OmniMergeError(f"{loaded.path}: neither the generation config nor the tokenizer names an "
                                 "end-of-sequence token")
        self._pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        if self._pad is None:
            self._pad = min(self._eos)
        self._drop = {self._pad, self.tokenizer.bos_token_id} - {None}

    @classmethod
    def from_source(cls, source: Any, *, base: str | Path | None = None, device: str = "cpu", dtype: Any = None,
                    batch_size: int = 8, progress: bool = True,
                    processor_kwargs: dict[str, Any] | None = None) -> TransformersBackend:
        """Load ``source`` (see :func:`~omnimerge.eval.models.load_model`) and wrap it."""
        return cls(load_model(source, base=base, device=device, dtype=dtype, processor_kwargs=processor_kwargs),
                   batch_size=batch_size, progress=progress)

    # -- sizes ------------------------------------------------------------------------------------------------
    def _image_sizes(self, images: Sequence[Any], inputs: Any) -> list[tuple[int, int]]:
        """Each image's (width, height) as the processor resized it."""
        ip = getattr(self.processor, "image_processor", None)
        grid = inputs.get("image_grid_thw") if hasattr(inputs, "get") else None
        if grid is not None and ip is not None:  # Qwen2-VL / Qwen2.5-VL: patches x patch size
            patch = int(ip.patch_size)
            return [(int(w) * patch, int(h) * patch) for _, h, w in grid.tolist()]
        out = []
        for im in images:
            size = None
            if ip is not None:
                crop, target = getattr(ip, "crop_size", None), getattr(ip, "size", None)
                if getattr(ip, "do_center_crop", False) and crop and "height" in crop:
                    size = (int(crop["width"]), int(crop["height"]))
                elif getattr(ip, "do_resize", True) and target and "height" in target and "width" in target:
                    size = (int(target["width"]), int(target["height"]))
            out.append(size or (int(im.width), int(im.height)))
        return out

    # -- generation -------------------------------------------------------------------------------------------
    def _encode(self, batch: Sequence[Request]) -> Any:
        import torch

        if not self.multimodal and any(r.images for r in batch):
            raise OmniMergeError(f"{self.loaded.path}: a text-only model (no image processor) was given a request "
                                 "with images")
        texts = [self.processor.apply_chat_template(_messages(r, self.multimodal), tokenize=False,
                                                    add_generation_prompt=True) for r in batch]
        # a template that writes the BOS itself must not get a second one (as transformers' own
        # apply_chat_template(tokenize=True) decides)
        bos = self.tokenizer.bos_token
        special = {"add_special_tokens": False} if bos and all(t.startswith(bos) for t in texts) else {}
        if not self.multimodal:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, **special)
            return inputs.to(self.model.device), []
        per_request = [[im.convert("RGB") for im in r.images] for r in batch]
        images = [im for ims in per_request for im in ims]
        # nested per request (what processors of interleaved families need) where every request has an image;
        # a flat list otherwise (processors that count image tokens in the text take either)
        arg: Any = (per_request if all(per_request) else images) if images else None
        inputs = self.processor(text=texts, images=arg, return_tensors="pt", padding=True, **special)
        dtype = self.model.dtype
        inputs = inputs.to(self.model.device)
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                inputs[k] = v.to(dtype)
        return inputs, images

    def _decode(self, ids: list[int], limit: int) -> str:
        kept: list[int] = []
        for t in ids[:limit]:
            if t in self._eos:
                break
            if t not in self._drop:
                kept.append(t)
        return str(self.tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def _run_batch(self, batch: Sequence[Request]) -> list[Generation]:
        import torch

        inputs, images = self._encode(batch)
        max_new = max(r.max_new_tokens for r in batch)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                      temperature=None, top_p=None, top_k=None, pad_token_id=self._pad,
                                      eos_token_id=sorted(self._eos))
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        sizes = self._image_sizes(images, inputs)
        gens, at = [], 0
        for r, ids in zip(batch, new, strict=True):
            n = len(r.images)
            gens.append(Generation(self._decode(ids, r.max_new_tokens), tuple(sizes[at:at + n])))
            at += n
        return gens

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Greedy answers to ``requests``, in request order (batches of similar length; deterministic)."""
        from contextlib import nullcontext

        # longest first (prompt text, images, generation length), ties in request order: batches pad little and
        # the order is the same on every run
        order = sorted(range(len(requests)), key=lambda i: (-requests[i].max_new_tokens, -len(requests[i].images),
                                                            -len(requests[i].prompt), i))
        results: list[Generation | None] = [None] * len(requests)
        t0 = time.perf_counter()
        if self.progress and requests:
            from rich.console import Console
            from rich.progress import Progress

            bar: Any = Progress(*_progress_columns(), console=Console(stderr=True), transient=False)
        else:
            bar = None
        with bar if bar is not None else nullcontext():
            task = bar.add_task("generating", total=len(requests)) if bar is not None else None
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                for i, g in zip(idx, self._run_batch([requests[i] for i in idx]), strict=True):
                    results[i] = g
                if bar is not None:
                    bar.advance(task, len(idx))
        dt = time.perf_counter() - t0
        self.last_stats = {"requests": float(len(requests)), "seconds": dt,
                           "requests_per_s": len(requests) / dt if dt > 0 else 0.0}
        return [g for g in results if g is not None]
