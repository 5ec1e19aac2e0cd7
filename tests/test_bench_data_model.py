"""Benchmark data (determinism, disjoint splits, answers) and the tiny model's save/load round trip."""

from __future__ import annotations

import os

import numpy as np
import pytest

from omnimerge.bench import TASKS
from omnimerge.bench import data as D

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _fingerprint(exs: list[D.Example]) -> list[tuple]:
    return [(e.question, e.answer, e.key, np.asarray(e.image).tobytes()) for e in exs]


@pytest.mark.parametrize("task", TASKS)
def test_data_deterministic_and_seeded(task: str) -> None:
    a = D.make_split(task, "train", 40, seed=3)
    b = D.make_split(task, "train", 40, seed=3)
    c = D.make_split(task, "train", 40, seed=4)
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(a) != _fingerprint(c)
    for e in a:
        assert e.image.size == (32, 32) and e.image.mode == "RGB"
        assert np.asarray(e.image).max() > 0  # something is drawn
        assert len(e.answer.split()) == D.ANSWER_TOKENS[task]


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint(task: str) -> None:
    keys = {s: {e.key for e in D.make_split(task, s, 300 if s == "train" else 100)} for s in D.SPLITS}
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # captioning samples of the base live in the same buckets: no test image is captioned in training
    cap = {e.key for e in D.make_split(task, "train", 300, caption=True)}
    assert not cap & keys["test"]


def test_answers_are_consistent_with_images() -> None:
    # chart: the highest bar's answer matches the tallest column of coloured pixels
    for e in D.make_split("chart", "test", 30):
        if e.meta["qtype"] != "highest":
            continue
        arr = np.asarray(e.image).sum(-1) > 0
        heights = [int(arr[:, 8 * i : 8 * i + 8].any(1).sum()) for i in range(4)]
        assert e.answer == f"b{int(np.argmax(heights)) + 1}"
    # grounding: the gold box covers pixels of the named colour only
    for e in D.make_split("grounding", "test", 20):
        x1, y1, x2, y2 = (round(v * 32) for v in e.meta["box"])
        colour = e.question.split()[3]
        patch = np.asarray(e.image)[y1:y2, x1:x2].reshape(-1, 3)
        assert (patch == np.asarray(D.COLORS[colour])).all()
    # vqa counts
    for e in D.make_split("vqa", "test", 40):
        if e.meta["qtype"] == "count":
            assert e.answer in {"1", "2", "3", "4"}


def test_vocabulary_covers_every_word() -> None:
    vocab = set(D.vocabulary())
    for t in TASKS:
        for e in D.make_split(t, "train", 50) + D.make_split(t, "train", 20, caption=True):
            assert set(e.question.split()) <= vocab
            assert set(e.answer.split()) <= vocab


def test_shuffled_answers_keep_format_not_content() -> None:
    exs = D.make_split("ocr", "train", 200)
    sh = D.shuffled_answers(exs, seed=0)
    assert sorted(e.answer for e in exs) == sorted(e.answer for e in sh)
    assert sum(a.answer == b.answer for a, b in zip(exs, sh, strict=True)) < 20


def test_model_tokenizer_processor_round_trip(tmp_path) -> None:
    import torch
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from omnimerge.bench import model as M

    model = M.build_model(seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 5_000_000
    M.save_checkpoint(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(proc).__name__ == "LlavaProcessor"
    assert type(proc.image_processor).__name__ == "CLIPImageProcessorPil"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.convert_tokens_to_ids("<image>") == M.IMAGE == model.config.image_token_index
    assert tok("read the text ?")["input_ids"] == M.Encoder().words("read the text ?")

    exs = [D.make_split("vqa", "test", 3)[i] for i in range(3)]
    enc = M.Encoder()
    batch = proc(images=[e.image for e in exs], text=["<s> <image> " + e.question for e in exs],
                 padding="max_length", max_length=M.PROMPT_LEN, return_tensors="pt")
    # the processor expands <image> into 16 tokens and produces exactly the bench's fast encoding
    assert batch["input_ids"].tolist() == [enc.prompt(e.question) for e in exs]
    assert np.allclose(batch["pixel_values"].numpy(), M.pixel_array([e.image for e in exs]), atol=1e-6)

    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        a = model(**batch).logits
        b = loaded(**batch).logits
    assert torch.equal(a, b)


def test_greedy_decode_cache_matches_no_cache() -> None:
    from omnimerge.bench import model as M
    from omnimerge.bench.evaluate import build_evalset, greedy_decode

    model = M.build_model(seed=1).eval()
    es = build_evalset("grounding", "test", 12, 0, M.Encoder())
    a = greedy_decode(model, es.ids, es.pixel, 4, use_cache=True)
    b = greedy_decode(model, es.ids, es.pixel, 4, use_cache=False)
    assert a == b
    assert all(M.IMAGE not in row and M.PAD not in row for row in a)  # forbidden at decode time


def test_lora_initialisation_follows_the_seed() -> None:
    """The zoo's LoRA experts start from the same adapters for the same seed (peft draws lora_A from torch's
    global generator, which a spawned worker seeds at random), different ones for another seed, and the caller's
    generator state is left alone."""
    import torch

    from omnimerge.bench import model as M
    from omnimerge.bench.train import TrainSpec, add_lora

    spec = TrainSpec(steps=1, lr=1e-3, lora_r=4)

    def lora_a(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        model = M.build_model(seed=0)
        torch.manual_seed(global_seed)  # any global state: the adapters must not depend on it
        before = torch.random.get_rng_state()
        m = add_lora(model, spec, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), before), "add_lora moved the caller's generator"
        return {k: v.detach().clone() for k, v in m.state_dict().items() if "lora_A" in k}

    a, b, c = lora_a(5, 123), lora_a(5, 999), lora_a(6, 123)
    assert a and a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
