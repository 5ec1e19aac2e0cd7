"""The evaluation model backends on tiny random-weight VLMs built offline (tests/tiny_vlms.py).

* each family (Qwen2-VL, Qwen2.5-VL, InternVL, LLaVA) loads from its folder with its own processor and chat
  template; a batch of requests with tiny PIL images gives texts in request order, the same batched as one by
  one, the same on a second run; image sizes are the processor's (Qwen: the smart-resized grid);
* decoding keeps the family's box tokens and drops padding and what follows the end of sequence;
* a PEFT adapter folder loads on its base (from adapter_config.json, or an explicit base);
* a merge recipe evaluated in memory gives the same weights and generations as its written checkpoint, and a
  re-merge with other parameters into the same loaded model equals that checkpoint too;
* bad inputs (missing folder, no config, unknown architecture, remerge without a recipe) give one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

torch.set_num_threads(1)

from tiny_vlms import FAMILIES, save_family, save_tiny_vlm  # noqa: E402

from omnimerge.errors import CheckpointError, OmniMergeError  # noqa: E402
from omnimerge.eval.backends import TransformersBackend  # noqa: E402
from omnimerge.eval.models import load_model  # noqa: E402
from omnimerge.eval.protocol import Request  # noqa: E402

SIZES = [(40, 30), (47, 35), (61, 45), (20, 50), (33, 33)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {f: save_tiny_vlm(f, root / f) for f in FAMILIES}


def requests() -> list[Request]:
    colors = ["red", "blue", "green", "white", "black"]
    words = ["what is the color", "how many box", "find the text", "what is this", "answer yes or no"]
    # distinct generation lengths, so that a text out of order is seen by its length
    return [Request((Image.new("RGB", s, c),), w, 3 + i)
            for i, (s, c, w) in enumerate(zip(SIZES, colors, words, strict=True))]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_generates_in_order_batched_as_alone(zoo: dict[str, Path], family: str) -> None:
    b = TransformersBackend.from_source(zoo[family], batch_size=3, progress=False)
    assert type(b.processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                          "internvl": "InternVLProcessor", "llava": "LlavaProcessor"}[family]
    assert b.box_format == {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen25vl", "internvl": "internvl",
                            "llava": "normalized"}[family]
    reqs = requests()
    batched = b.generate(reqs)
    assert len(batched) == len(reqs)
    alone = [b.generate([r])[0] for r in reqs]
    assert batched == alone
    assert b.generate(reqs) == batched  # deterministic
    longer = b.generate([Request(r.images, r.prompt, r.max_new_tokens + 3) for r in reqs])
    for g, g2 in zip(batched, longer, strict=True):
        assert g.text and b.tokenizer.pad_token not in g.text
        assert g2.text.startswith(g.text) and len(g2.text) >= len(g.text)  # each cut at its own length
    assert any(g2.text != g.text for g, g2 in zip(batched, longer, strict=True))
    assert b.last_stats["requests"] == len(reqs) and b.last_stats["requests_per_s"] > 0
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # smart_resize on a 16-pixel grid (patch 8 x merge 2), 16x16 <= pixels <= 64x64, rounded to nearest
        assert [g.image_sizes for g in batched] == [((32, 32),), ((48, 32),), ((64, 48),), ((16, 48),),
                                                    ((32, 32),)]
    else:  # InternVL's and LLaVA's processors resize every image to 32 x 32
        assert all(g.image_sizes == ((32, 32),) for g in batched)


def test_processor_kwargs_set_the_resize(zoo: dict[str, Path]) -> None:
    b = TransformersBackend.from_source(zoo["qwen2_vl"], progress=False, processor_kwargs={"max_pixels": 32 * 32})
    [g] = b.generate([Request((Image.new("RGB", (61, 45)),), "what is this", 2)])
    # 61x45 over 1024 pixels: scaled by sqrt(61*45/1024) = 1.636 and floored to the 16-pixel grid
    assert g.image_sizes == ((32, 16),)


def _spy_generate(b: TransformersBackend) -> dict[str, Any]:
    """Record the keyword arguments of the backend's next ``model.generate`` calls (the call still runs)."""
    seen: dict[str, Any] = {}
    real = b.model.generate

    def spy(**kw: Any) -> Any:
        seen.update(kw)
        return real(**kw)

    b.model.generate = spy
    return seen


def test_prompt_goes_through_chat_template(zoo: dict[str, Path]) -> None:
    b = TransformersBackend.from_source(zoo["qwen2_vl"], progress=False)
    seen = _spy_generate(b)
    b.generate([Request((Image.new("RGB", (32, 32)),), "what is the color", 2)])
    text = b.tokenizer.decode(seen["input_ids"][0])
    assert text.startswith("<|im_start|> user")
    assert "<|vision_start|>" in text and text.count("<|image_pad|>") == 4  # 32x32 -> 2x2 merged patches
    assert text.rstrip().endswith("<|im_start|> assistant")
    assert seen["do_sample"] is False and seen["pixel_values"].dtype == torch.float32


def test_decoding_keeps_box_tokens_drops_pad_and_after_eos(zoo: dict[str, Path]) -> None:
    b = TransformersBackend.from_source(zoo["qwen2_vl"], progress=False)
    tok = b.tokenizer
    ids = tok.convert_tokens_to_ids(["<|box_start|>", "(", "1", ",", "2", ")", "<|box_end|>", "<|im_end|>", "red",
                                     "<|endoftext|>"])

    def fake_generate(input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        new = torch.tensor([ids] * input_ids.shape[0])
        return torch.cat([input_ids, new], dim=1)

    b.model.generate = fake_generate
    [g] = b.generate([Request((Image.new("RGB", (32, 32)),), "find the box", 20)])
    assert g.text == "<|box_start|> ( 1 , 2 ) <|box_end|>"  # the tiny word-level tokenizer joins with spaces
    [short] = b.generate([Request((Image.new("RGB", (32, 32)),), "find the box", 2)])
    assert short.text == "<|box_start|> ("


def test_requests_without_images_and_mixed(zoo: dict[str, Path]) -> None:
    b = TransformersBackend.from_source(zoo["llava"], batch_size=4, progress=False)
    reqs = [Request((), "what is the color", 3), Request((Image.new("RGB", (32, 32)),), "how many box", 4)]
    out = b.generate(reqs)
    assert out[0].image_sizes == () and out[1].image_sizes == ((32, 32),)
    assert out == [b.generate([r])[0] for r in reqs]


def test_progress_bar_runs(zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    b = TransformersBackend.from_source(zoo["llava"], progress=True)
    b.generate(requests()[:2])
    out = capsys.readouterr()
    assert "req/s" in out.out + out.err and "2/2" in out.out + out.err


def _lm_linear(model: Any, suffix: str) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if n.endswith(suffix)).detach().clone()


def test_peft_adapter_loads_on_its_base(zoo: dict[str, Path], tmp_path: Path) -> None:
    import peft
    import transformers as T

    base_dir = zoo["llava"]
    model = T.AutoModelForImageTextToText.from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                          init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "adapter")
    sd = dict(pm.named_parameters())
    a = next(v for k, v in sd.items() if "language_model.layers.0.self_attn.q_proj.lora_A" in k).detach()
    bm = next(v for k, v in sd.items() if "language_model.layers.0.self_attn.q_proj.lora_B" in k).detach()
    q0 = "language_model.layers.0.self_attn.q_proj.weight"
    w0 = _lm_linear(T.AutoModelForImageTextToText.from_pretrained(base_dir), q0)
    expect = w0 + (4 / 2) * bm @ a
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(base_dir)

    loaded = load_model(tmp_path / "adapter")
    assert loaded.kind == "adapter"
    got = _lm_linear(loaded.model, q0)
    torch.testing.assert_close(got, expect)
    assert not torch.equal(got, w0)
    out = TransformersBackend(loaded, progress=False).generate(requests()[:2])
    assert len(out) == 2

    # an explicit base wins over adapter_config.json's (here: one that no longer exists)
    acfg["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(CheckpointError, match="moved-away"):
        load_model(tmp_path / "adapter")
    again = load_model(tmp_path / "adapter", base=base_dir)
    torch.testing.assert_close(_lm_linear(again.model, q0), expect)


@pytest.fixture(scope="module")
def family_dir(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return zoo["qwen2_vl"], save_family(zoo["qwen2_vl"], tmp_path_factory.mktemp("family"))


def test_recipe_in_memory_equals_written_checkpoint(family_dir: tuple[Path, list[Path]], tmp_path: Path) -> None:
    import omnimerge

    base_dir, experts = family_dir
    recipe = {"base_model": str(base_dir), "models": [{"model": str(e)} for e in experts],
              "merge_method": "ties", "parameters": {"scaling": 0.6, "density": 0.5}}
    reqs = requests()
    written = {}
    for lam in (0.6, 1.0):
        omnimerge.merge(recipe, tmp_path / f"m{lam}", overrides=[f"parameters.scaling={lam}"])
        disk = TransformersBackend.from_source(tmp_path / f"m{lam}", batch_size=5, progress=False)
        written[lam] = (disk.model.state_dict(), disk.generate(reqs))

    base_backend = TransformersBackend.from_source(base_dir, batch_size=5, progress=False)
    base_texts, base_sd = base_backend.generate(reqs), base_backend.model.state_dict()
    assert any(not torch.equal(base_sd[k], written[0.6][0][k]) for k in base_sd)  # the merge moved weights
    with load_model(recipe) as loaded:
        assert loaded.kind == "recipe"
        mem = TransformersBackend(loaded, batch_size=5, progress=False)
        for lam in (0.6, 1.0):
            if lam != 0.6:
                loaded.remerge({"scaling": lam, "density": 0.5})
            sd, texts = written[lam]
            msd = loaded.model.state_dict()
            assert sd.keys() == msd.keys()
            assert all(torch.equal(sd[k], msd[k]) for k in sd)
            assert mem.generate(reqs) == texts
    assert written[0.6][1] != base_texts or written[1.0][1] != base_texts  # the merge changed what it says
    # the same recipe as a YAML file, with parameters overridden at load
    import yaml

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with load_model(tmp_path / "recipe.yaml", merge_parameters={"scaling": 1.0, "density": 0.5}) as from_yaml:
        assert from_yaml.path == tmp_path / "recipe.yaml"
        ysd = from_yaml.model.state_dict()
        assert all(torch.equal(written[1.0][0][k], ysd[k]) for k in ysd)
    with pytest.raises(OmniMergeError, match="recipe"):
        load_model(base_dir).remerge({"scaling": 0.1})


def test_bad_inputs_one_line(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such folder") as e:
        load_model(tmp_path / "missing")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json") as e:
        load_model(tmp_path / "empty")
    assert "\n" not in str(e.value)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(CheckpointError, match="'no_such_arch' is not an architecture") as e:
        load_model(tmp_path / "odd")
    assert "\n" not in str(e.value)
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(CheckpointError, match="cannot generate") as e:
        load_model(tmp_path / "encoder")
    assert "\n" not in str(e.value)
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(CheckpointError, match="remote-code") as e:
        load_model(tmp_path / "remote")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_model("nobody-xyz/no-such-model-15b")


def test_hub_id_from_the_local_cache(zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llava"
    shutil.copytree(zoo["llava"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("tiny-org/tiny-llava")
    assert loaded.path == (repo / "snapshots" / "0123abcd").resolve()
    reqs = requests()[:2]
    assert (TransformersBackend(loaded, progress=False).generate(reqs)
            == TransformersBackend.from_source(zoo["llava"], progress=False).generate(reqs))


def test_dtype_casts_images_to_the_model(zoo: dict[str, Path]) -> None:
    b = TransformersBackend.from_source(zoo["llava"], dtype="bfloat16", progress=False)
    assert b.model.dtype == torch.bfloat16
    seen = _spy_generate(b)
    [g] = b.generate([Request((Image.new("RGB", (32, 32)),), "what is this", 3)])
    assert seen["pixel_values"].dtype == torch.bfloat16 and seen["input_ids"].dtype == torch.long and g.text


def test_several_images_in_one_request(zoo: dict[str, Path]) -> None:
    b = TransformersBackend.from_source(zoo["qwen2_vl"], batch_size=4, progress=False)
    reqs = [Request((Image.new("RGB", (40, 30)), Image.new("RGB", (61, 45), "blue")), "what is this", 3),
            Request((Image.new("RGB", (47, 35)),), "how many box", 4),
            Request((), "answer yes or no", 2)]
    out = b.generate(reqs)
    assert [g.image_sizes for g in out] == [((32, 32), (64, 48)), ((48, 32),), ()]
    assert out == [b.generate([r])[0] for r in reqs]


def test_text_only_model(tmp_path: Path) -> None:
    b = TransformersBackend.from_source(save_tiny_vlm("qwen2", tmp_path / "lm", seed=4), batch_size=2, progress=False)
    assert not b.multimodal and b.box_format == "normalized"
    reqs = [Request((), "what is the color", 3), Request((), "how many box", 5), Request((), "answer", 4)]
    out = b.generate(reqs)
    assert all(g.text and g.image_sizes == () for g in out)  # seed 4: this random model does not stop at once
    assert out == [b.generate([r])[0] for r in reqs]
    with pytest.raises(OmniMergeError, match="text-only model"):
        b.generate([requests()[0]])


def test_stops_at_the_tokenizers_end_of_turn_too(zoo: dict[str, Path]) -> None:
    loaded = load_model(zoo["qwen2_vl"])
    tok = loaded.processor.tokenizer
    end_of_text, end_of_turn = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    loaded.model.generation_config.eos_token_id = end_of_text  # as a base (not instruct) Qwen2-VL's config
    b = TransformersBackend(loaded, progress=False)
    seen: dict[str, Any] = {}
    ids = tok.convert_tokens_to_ids(["red", "<|im_end|>", "blue"])

    def fake_generate(input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.update(kw)
        return torch.cat([input_ids, torch.tensor([ids] * input_ids.shape[0])], dim=1)

    b.model.generate = fake_generate
    [g] = b.generate([Request((Image.new("RGB", (32, 32)),), "what is the color", 8)])
    assert g.text == "red"
    assert set(seen["eos_token_id"]) == {end_of_text, end_of_turn}
