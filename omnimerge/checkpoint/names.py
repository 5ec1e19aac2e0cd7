"""Tensor-name normalisation across transformers versions and model families.

transformers >= 4.52 names multimodal models' modules ``model.language_model.*``, ``model.vision_tower.*``,
``model.visual.*``, ``model.multi_modal_projector.*``, ``lm_head``; older versions (and, by default, what 4.52+
and 5.x still *write* to disk) use ``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.*``
(``vision_tower.vision_model.*`` before 5.x for CLIP/SigLIP towers), ``multi_modal_projector.*``; Qwen2-VL on
disk is ``model.layers.*`` + ``visual.*``; Idefics3/SmolVLM use ``model.text_model.*``.

:func:`canonical_name` maps every layout onto one canonical form so that experts saved by different versions
line up; the output always keeps the base checkpoint's own names. In the canonical form the language model of
every family (plain causal LMs included) lives under ``model.language_model.``, so a text-only LLM and the
language model inside a VLM line up too (modality merging).
"""

from __future__ import annotations

import re

# Ordered rewrite rules (pattern, replacement), applied once each, first to last.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        # LLaVA / LLaVA-NeXT / OneVision / Qwen2-Audio / Gemma-3 / InternVL(remote code) on disk (legacy):
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.(?=(layers|embed_tokens|norm|rotary_emb)\.)", "model.language_model."),
        # Idefics3 / SmolVLM text model:
        (r"^model\.text_model\.", "model.language_model."),
        # vision / audio / video towers and projectors saved at the top level:
        (r"^vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^video_tower\.", "model.video_tower."),
        (r"^audio_tower\.", "model.audio_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"^visual\.", "model.visual."),
        (r"^image_newline$", "model.image_newline"),
        # Qwen2-VL / Qwen2.5-VL on disk and plain causal LMs: model.layers.* -> model.language_model.layers.*
        (r"^model\.(?=(layers|embed_tokens|norm|rotary_emb)(\.|$))", "model.language_model."),
    )
)


def canonical_name(name: str) -> str:
    """The canonical form of a tensor name (see the module docstring)."""
    out = name
    for pat, rep in _RULES:
        out = pat.sub(rep, out, count=1)
    return out


def canonical_map(names: list[str] | tuple[str, ...] | set[str], where: str) -> dict[str, str]:
    """canonical -> original for a checkpoint's names; two names with one canonical form are an error."""
    from omnimerge.errors import CheckpointError

    out: dict[str, str] = {}
    for n in names:
        c = canonical_name(n)
        if c in out and out[c] != n:
            raise CheckpointError(
                f"{where}: tensors '{out[c]}' and '{n}' are the same parameter saved under two naming layouts"
            )
        out[c] = n
    return out
