"""Tiny models of every architecture family omnimerge knows, built offline from configs (random weights)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 256


def families() -> dict[str, Callable[[], Any]]:
    import transformers as T
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    text = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama = T.LlamaConfig(**text)
    qwen2 = T.Qwen2Config(**text)
    clip = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    sig = T.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8)
    pin = [[32, 32], [32, 64], [64, 32], [64, 64]]
    mrope = dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])
    idefics_vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    return {
        "qwen2_vl": lambda: T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
            text_config=dict(text, rope_parameters=mrope),
            vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=8,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 4, vision_end_token_id=V - 5)),
        "qwen2_5_vl": lambda: T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=mrope),
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                               patch_size=8, window_size=32, fullatt_block_indexes=[1]),
            image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 4, vision_end_token_id=V - 5)),
        "llava": lambda: T.LlavaForConditionalGeneration(
            T.LlavaConfig(vision_config=clip, text_config=llama, image_token_index=V - 1)),
        "llava_next": lambda: T.LlavaNextForConditionalGeneration(
            T.LlavaNextConfig(vision_config=clip, text_config=llama, image_token_index=V - 1,
                              image_grid_pinpoints=pin)),
        "llava_next_video": lambda: T.LlavaNextVideoForConditionalGeneration(
            T.LlavaNextVideoConfig(vision_config=clip, text_config=llama, image_token_index=V - 1,
                                   video_token_index=V - 2, image_grid_pinpoints=pin)),
        "llava_onevision": lambda: T.LlavaOnevisionForConditionalGeneration(
            T.LlavaOnevisionConfig(vision_config=sig, text_config=qwen2, image_token_index=V - 1,
                                   video_token_index=V - 2, image_grid_pinpoints=pin)),
        "internvl": lambda: T.InternVLForConditionalGeneration(T.InternVLConfig(
            vision_config=T.InternVLVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, image_size=[32, 32], patch_size=[8, 8]),
            text_config=qwen2, image_token_id=V - 1, image_seq_length=4, downsample_ratio=0.5)),
        "idefics3": lambda: T.Idefics3ForConditionalGeneration(T.Idefics3Config(
            vision_config=idefics_vision, text_config=llama, image_token_id=V - 1, scale_factor=2, pad_token_id=0)),
        "smolvlm": lambda: T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(
            vision_config=idefics_vision, text_config=llama, image_token_id=V - 1, scale_factor=2, pad_token_id=0)),
        "qwen2_audio": lambda: T.Qwen2AudioForConditionalGeneration(T.Qwen2AudioConfig(
            audio_config=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                              d_model=64, max_source_positions=50),
            text_config=qwen2.to_dict(), audio_token_index=V - 3)),
        "gemma3": lambda: T.Gemma3ForConditionalGeneration(T.Gemma3Config(
            text_config=T.Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           sliding_window=32),
            vision_config=idefics_vision, mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 2,
            eoi_token_index=V - 3)),
        "llama": lambda: T.LlamaForCausalLM(llama),
        "qwen2": lambda: T.Qwen2ForCausalLM(qwen2),
    }


def save_tensors(folder: Any, tensors: dict[str, Any]) -> Any:
    """``tensors`` as a one-shard checkpoint folder with a minimal Qwen2 config (for method tests on hand-made
    tensors); returns the folder."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    return folder
