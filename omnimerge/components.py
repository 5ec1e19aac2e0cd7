"""The component map: which part of a (multimodal) model every tensor belongs to.

Each tensor gets exactly one component:

==================  ======================================================================================
``language_model``  the language model's linear weights (2-D or stacked-expert ``*.weight``) — the OptMerge
                    paper merges only these by default
``embedding``       token / position embeddings of the language model
``lm_head``         the output head
``norm``            the language model's normalisation weights (RMSNorm/LayerNorm, q_norm/k_norm, ...)
``bias``            the language model's biases
``vision_tower``    the vision encoder (CLIP/SigLIP/InternViT/Qwen-VL ``visual`` blocks), everything in it
``audio_tower``     the audio encoder (Whisper-style, BEATs, ...)
``video_tower``     a separate video encoder
``projector``       the modality connector/projector (``multi_modal_projector``, Qwen-VL ``visual.merger``,
                    Idefics ``connector``, InternVL ``mlp1``, ``image_newline``)
``other``           anything else (buffers, unknown 1-D tensors)
==================  ======================================================================================

Classification works on canonical names (:mod:`omnimerge.checkpoint.names`) and shapes alone, so it covers
Qwen2-VL, Qwen2.5-VL, LLaVA, LLaVA-NeXT(-Video), LLaVA-OneVision, InternVL (native and remote-code names),
Idefics3/SmolVLM, Qwen2-Audio, Gemma-3 and plain causal LMs, and falls back on names for unknown
architectures: whatever is not recognised as a tower or projector is taken to be part of the language model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from omnimerge.checkpoint.names import canonical_name

COMPONENTS: tuple[str, ...] = (
    "language_model",
    "embedding",
    "lm_head",
    "norm",
    "bias",
    "vision_tower",
    "audio_tower",
    "video_tower",
    "projector",
    "other",
)

#: The OptMerge paper's selection: only the language model's linear weights.
DEFAULT_INCLUDE: tuple[str, ...] = ("language_model",)

_PROJECTOR = re.compile(
    r"^(model\.multi_modal_projector\.|model\.visual\.merger\.|model\.connector\.|mlp1\.|model\.mlp1\."
    r"|model\.mm_projector\.|model\.image_newline$|model\.audio_projector\.|model\.vision_projector\."
    r"|model\.video_projector\.|model\.embed_vision\.|model\.embed_audio\.)"
)
_VISION = re.compile(
    r"^(model\.vision_tower\.|model\.visual\.|vision_model\.|model\.vision_model\.|model\.vision_encoder\."
    r"|vision_encoder\.|model\.image_encoder\.|model\.vision_embed_tokens\.)"
)
_AUDIO = re.compile(r"^(model\.audio_tower\.|model\.audio_encoder\.|audio_encoder\.|model\.audio_model\.)")
_VIDEO = re.compile(r"^(model\.video_tower\.|model\.video_encoder\.)")
_LM_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output_layer)\.")
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|tok_embeddings|embed_in|embed_positions"
                    r"|position_embeddings|embeddings\.word_embeddings)\.")
_NORM = re.compile(r"(^|\.)([a-z_]*norm[a-z0-9_]*|ln_[a-z0-9]+|ln_f|ln\d*)\.[a-z_]+$")


def classify(name: str, shape: Sequence[int]) -> str:
    """The component of tensor ``name`` (any layout; it is canonicalised first) with shape ``shape``."""
    c = canonical_name(name)
    if _PROJECTOR.search(c):
        return "projector"
    if _VISION.search(c):
        return "vision_tower"
    if _AUDIO.search(c):
        return "audio_tower"
    if _VIDEO.search(c):
        return "video_tower"
    if _LM_HEAD.search(c):
        return "lm_head"
    if _EMBED.search(c):
        return "embedding"
    if _NORM.search(c):
        return "norm"
    if c.endswith(".bias"):
        return "bias"
    if c.endswith("weight") and len(shape) >= 2:
        return "language_model"
    return "other"


class Selector:
    """Which tensors a recipe merges: ``include`` / ``exclude`` lists of component names or regexes.

    A tensor is merged when it matches an ``include`` entry and no ``exclude`` entry. A component name matches
    the tensors of that component; any other string is a regular expression searched in the tensor's name as
    stored in the base checkpoint and in its canonical name.
    """

    def __init__(self, include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = ()) -> None:
        from omnimerge.errors import RecipeError

        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self._compiled: dict[str, re.Pattern[str]] = {}
        for entry in self.include + self.exclude:
            if entry in COMPONENTS:
                continue
            try:
                self._compiled[entry] = re.compile(entry)
            except re.error as e:
                raise RecipeError(
                    f"select: '{entry}' is neither a component ({', '.join(COMPONENTS)}) nor a valid regular "
                    f"expression ({e})"
                ) from None

    def _match(self, entry: str, name: str, canonical: str, component: str) -> bool:
        if entry in COMPONENTS:
            return component == entry
        pat = self._compiled[entry]
        return bool(pat.search(name) or pat.search(canonical))

    def selects(self, name: str, component: str) -> bool:
        canonical = canonical_name(name)
        if not any(self._match(e, name, canonical, component) for e in self.include):
            return False
        return not any(self._match(e, name, canonical, component) for e in self.exclude)
