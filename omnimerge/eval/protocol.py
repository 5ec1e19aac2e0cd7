"""The contract between the task pool and the model backends.

A task turns each example of its dataset into a :class:`Request` (images, the user turn's text before any chat
template, a generation length); a backend applies the model's own chat template and processor, generates, and
returns a :class:`Generation` per request (the raw text, and the size of each image as the model saw it, which
Qwen2.5-VL's pixel boxes need); the task scores the text. Neither side knows the other's internals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

#: how a model family writes bounding boxes (see docs/evaluation.md and boxes parsing in the task pool):
#: ``qwen2vl``: integers on a relative [0, 1000) grid (Qwen2-VL, Qwen3-VL); ``qwen25vl``: absolute pixels of
#: the processor-resized image (Qwen2.5-VL); ``internvl``: relative [0, 1000] (InternVL2/2.5); ``normalized``:
#: floats in [0, 1] of the image (LLaVA, Idefics/SmolVLM and the lmms-eval prompt's request)
BOX_FORMATS = ("qwen2vl", "qwen25vl", "internvl", "normalized")

_FAMILY_BOXES = {
    "qwen2_vl": "qwen2vl",
    "qwen3_vl": "qwen2vl",
    "qwen3_vl_moe": "qwen2vl",
    "qwen2_5_vl": "qwen25vl",
    "internvl": "internvl",
    "internvl_chat": "internvl",
}


def box_format_for(model_type: str) -> str:
    """The box convention of a model family, from its config's ``model_type`` (never guessed per answer)."""
    return _FAMILY_BOXES.get(model_type, "normalized")


@dataclass(frozen=True)
class Request:
    """One generation: the images in the order the prompt refers to them, the user turn's text (question and
    instruction, no chat template), and the number of new tokens allowed (greedy decoding)."""

    images: tuple[Image.Image, ...]
    prompt: str
    max_new_tokens: int


@dataclass(frozen=True)
class Generation:
    """What a backend returns for one request: the generated text as decoded (special tokens kept where the
    family writes boxes with them, e.g. Qwen2-VL's ``<|box_start|>``), and each image's (width, height) as the
    model saw it after its processor's resize."""

    text: str
    image_sizes: tuple[tuple[int, int], ...]


class Backend(Protocol):
    """A loaded model that answers requests (transformers by default; vLLM on GPUs)."""

    #: the model family's box convention (one of BOX_FORMATS), taken from its config
    box_format: str

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Greedy answers to ``requests``, in order (batched as the backend sees fit)."""
        ...
