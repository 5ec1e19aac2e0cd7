"""Tiny random-weight VLM checkpoints with real tokenizers, processors and chat templates, built offline.

Each :func:`save_tiny_vlm` folder holds what a hub checkpoint holds (config, safetensors, tokenizer files,
processor config, chat template), so that the evaluation backends load it exactly as they load a real model.
The tokenizer is word-level over a small vocabulary plus the family's special tokens (``<|im_start|>``,
``<|box_start|>``, ``<IMG_CONTEXT>`` ...); the processors are transformers' own (PIL image processors, no
torchvision)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the", "a", "what", "is", "color", "of", "box", "red", "blue", "green", "how", "many", "answer", "yes",
         "no", "one", "two", "three", "user", "assistant", "system", "you", "are", "helpful", "question", "image",
         "word", "short", "in", "this", "find", "text", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", "(",
         ")", "[", "]")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<|box_start|>", "<|box_end|>", "<|object_ref_start|>",
                "<|object_ref_end|>")
INTERNVL_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<ref>",
                    "</ref>", "<box>", "</box>", "<video>")
LLAVA_SPECIAL = ("<s>", "</s>", "<image>")

#: ChatML with images in the user turn, as Qwen2-VL's template renders them
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "internvl", "llava")


def _tokenizer(special: tuple[str, ...], pad: str, eos: str, extra: dict[str, str]) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    for t in (*special, *WORDS):
        vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<unk>", *special)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token=pad, eos_token=eos,
                                  extra_special_tokens=extra,
                                  padding_side="left", model_max_length=512)
    return tok


def _text_config(tok: Any, eos: str) -> dict[str, Any]:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids(eos), bos_token_id=None,
                tie_word_embeddings=False)


def build(family: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of a tiny ``family`` (one of :data:`FAMILIES`), random weights from ``seed``."""
    import torch
    import transformers as T
    from transformers.utils import logging

    from omnimerge.eval.models import image_only

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        tok = _tokenizer(QWEN_SPECIAL, "<|endoftext|>", "<|im_end|>",
                         {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
        text = dict(_text_config(tok, "<|im_end|>"),
                    rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]))
        image_proc = T.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                                min_pixels=16 * 16, max_pixels=64 * 64)
        common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        if family == "qwen2_vl":
            config = T.Qwen2VLConfig(text_config=text, vision_config=dict(
                depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=8, spatial_merge_size=2,
                temporal_patch_size=2), **common)
            model = T.Qwen2VLForConditionalGeneration(config)
            proc = image_only(T.Qwen2VLProcessor)(image_processor=image_proc, tokenizer=tok, video_processor=None,
                                                  chat_template=QWEN_TEMPLATE)
        else:
            config = T.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
                depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=8,
                spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1]), **common)
            model = T.Qwen2_5_VLForConditionalGeneration(config)
            proc = image_only(T.Qwen2_5_VLProcessor)(image_processor=image_proc, tokenizer=tok, video_processor=None,
                                                     chat_template=QWEN_TEMPLATE)
    elif family == "internvl":
        tok = _tokenizer(INTERNVL_SPECIAL, "<|endoftext|>", "<|im_end|>",
                         {"start_image_token": "<img>", "end_image_token": "</img>",
                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
        config = T.InternVLConfig(
            vision_config=T.InternVLVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, image_size=[32, 32], patch_size=[8, 8]),
            text_config=T.Qwen2Config(**_text_config(tok, "<|im_end|>")),
            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5)
        model = T.InternVLForConditionalGeneration(config)
        image_proc = T.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
        proc = image_only(T.InternVLProcessor)(image_processor=image_proc, tokenizer=tok, video_processor=None,
                                               image_seq_length=4,
                                   chat_template=INTERNVL_TEMPLATE)
    elif family == "llava":
        tok = _tokenizer(LLAVA_SPECIAL, "<pad>", "</s>", {"image_token": "<image>"})
        clip = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
        config = T.LlavaConfig(vision_config=clip, text_config=T.LlamaConfig(**_text_config(tok, "</s>")),
                               image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
        model = T.LlavaForConditionalGeneration(config)
        image_proc = T.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = T.LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                image_token="<image>", chat_template=LLAVA_TEMPLATE)
    elif family == "qwen2":  # a text-only causal LM: the processor is its tokenizer
        tok = _tokenizer(QWEN_SPECIAL, "<|endoftext|>", "<|im_end|>", {})
        tok.chat_template = QWEN_TEMPLATE
        config = T.Qwen2Config(**_text_config(tok, "<|im_end|>"))
        model = T.Qwen2ForCausalLM(config)
        proc = tok
    else:
        raise ValueError(f"unknown tiny VLM family {family!r}")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.eval()
    return model, proc


def save_tiny_vlm(family: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny ``family`` checkpoint (model, tokenizer, processor, chat template) into ``out``."""
    model, proc = build(family, seed)
    out = Path(out)
    model.save_pretrained(out)
    if getattr(proc, "video_processor", "") is not None:
        proc.save_pretrained(out)
        return out
    # an image-only processor: save its parts as a hub checkpoint has them (processor_save would need the video
    # processor, i.e. torchvision)
    proc.image_processor.save_pretrained(out)
    proc.tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(proc.chat_template, encoding="utf-8")
    extra = {"image_seq_length": proc.image_seq_length} if hasattr(proc, "image_seq_length") else {}
    (out / "processor_config.json").write_text(json.dumps({"processor_class": type(proc).__name__, **extra}))
    return out


def save_family(base_dir: Path, root: Path, n: int = 2, scale: float = 0.5) -> list[Path]:
    """``n`` full fine-tuned experts of the checkpoint in ``base_dir`` (seeded random task vectors), saved under
    ``root/expert<i>``: a family to merge."""
    import transformers as T

    from omnimerge.examples import make_expert

    base = T.AutoModelForImageTextToText.from_pretrained(base_dir)
    experts = []
    for i in range(n):
        d = Path(root) / f"expert{i}"
        make_expert(base, seed=100 + i, scale=scale).save_pretrained(d)
        for f in Path(base_dir).iterdir():  # the processor files a fine-tuned checkpoint ships with
            if f.is_file() and not f.name.startswith(("model", "config.json", "generation_config")):
                (d / f.name).write_bytes(f.read_bytes())
        experts.append(d)
    return experts
