"""The tiny multimodal LLM: a real ``LlavaForConditionalGeneration`` with its tokenizer and processor.

* Vision: ``CLIPVisionModel`` (hidden 128, 2 layers, 32 x 32 images, patch 8 -> 16 image tokens, CLS dropped).
* Text: ``LlamaForCausalLM`` (hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 384), word-level vocabulary.
* Tokenizer: a ``tokenizers`` WordLevel model (whitespace split) wrapped as a fast tokenizer, with the
  special tokens ``<pad> <unk> <s> </s> <image>``.
* Processor: ``LlavaProcessor`` with ``CLIPImageProcessorPil`` (no torchvision needed).

Everything is saved with ``save_pretrained``; ``AutoProcessor.from_pretrained`` and
``LlavaForConditionalGeneration.from_pretrained`` load it offline, exactly as real checkpoints are loaded.

Prompt layout (what the processor produces for ``"<s> <image> " + question`` and what training uses)::

    [<pad> ... <pad>] <s> <image> x 16 question-words   answer-words </s>
    \\-- left padding to PROMPT_LEN --/                  \\-- loss here --/
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = range(5)
IMAGE_TOKENS = 16
MAX_QUESTION = 8
PROMPT_LEN = 1 + IMAGE_TOKENS + MAX_QUESTION  # left-padded prompt length
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the tiny Llava (part of the zoo's config hash)."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 384
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 384
    image_size: int = 32
    patch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quiet_transformers() -> None:
    """No per-load progress bars / info logs from transformers (the bench loads hundreds of checkpoints)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older/newer transformers
        pass


def build_tokenizer() -> Any:
    """The word-level fast tokenizer (``PreTrainedTokenizerFast``) over the benchmark's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from omnimerge.bench.data import vocabulary

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=64,
    )
    return tok


def build_image_processor(spec: ModelSpec | None = None) -> Any:
    from transformers import CLIPImageProcessorPil

    spec = spec or ModelSpec()
    s = spec.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_processor(spec: ModelSpec | None = None, tokenizer: Any = None) -> Any:
    """The real ``LlavaProcessor`` (image processor without torchvision + the word-level tokenizer)."""
    from transformers import LlavaProcessor

    spec = spec or ModelSpec()
    return LlavaProcessor(
        image_processor=build_image_processor(spec),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def build_config(spec: ModelSpec | None = None, vocab_size: int | None = None) -> Any:
    import transformers as T

    spec = spec or ModelSpec()
    if vocab_size is None:
        vocab_size = len(build_tokenizer())
    text = T.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    vision = T.CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    n_img = (spec.image_size // spec.patch_size) ** 2
    cfg = T.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE,
        image_seq_length=n_img,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    return cfg


def build_model(spec: ModelSpec | None = None, seed: int = 0) -> Any:
    """A freshly initialised tiny Llava (deterministic for a given seed)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg = build_config(spec)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    return model


def save_checkpoint(model: Any, out: str | Path, processor: Any = None) -> Path:
    """``save_pretrained`` of the model and its processor (tokenizer + image processor) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (processor if processor is not None else build_processor()).save_pretrained(out)
    return out


def load_model(path: str | Path) -> Any:
    """Load a checkpoint folder (full weights) or a peft adapter folder (merged into its base) for evaluation."""
    from transformers import LlavaForConditionalGeneration

    quiet_transformers()
    path = Path(path)
    if (path / "adapter_config.json").exists():
        import json

        from peft import PeftModel

        base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = LlavaForConditionalGeneration.from_pretrained(base_path, trust_remote_code=False)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return LlavaForConditionalGeneration.from_pretrained(path, trust_remote_code=False)


# ---------------------------------------------------------------------------------------------------------------
# fast encoding (numpy) -- identical to what the processor produces; tests check this


def pixel_array(images: list[Any]) -> np.ndarray:
    """Images (32 x 32 PIL) -> normalised ``float32`` array (N, 3, H, W), as ``CLIPImageProcessorPil`` does."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


class Encoder:
    """Word -> id encoding of prompts and answers with the benchmark tokenizer's vocabulary."""

    def __init__(self, tokenizer: Any = None) -> None:
        tok = tokenizer if tokenizer is not None else build_tokenizer()
        self.vocab: dict[str, int] = dict(tok.get_vocab())
        self.inv = {i: w for w, i in self.vocab.items()}
        self.size = len(self.vocab)

    def words(self, text: str) -> list[int]:
        return [self.vocab.get(w, UNK) for w in text.split()]

    def prompt(self, question: str) -> list[int]:
        q = self.words(question)
        if len(q) > MAX_QUESTION:
            raise ValueError(f"question longer than {MAX_QUESTION} words: {question!r}")
        ids = [BOS] + [IMAGE] * IMAGE_TOKENS + q
        return [PAD] * (PROMPT_LEN - len(ids)) + ids

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i in (PAD, BOS, IMAGE):
                continue
            out.append(self.inv.get(int(i), "<unk>"))
        return " ".join(out)
