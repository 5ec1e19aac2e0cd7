"""The modality suite: data, the composite model (routing each input to its encoder gives exactly each
architecture's own forward), and a quick end-to-end run through ``omnimerge.merge(mode: modality)``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnimerge.bench import modality as M

torch.set_num_threads(1)


def test_scenes_and_rendering() -> None:
    s = M.sample_scene(np.random.default_rng(0))
    assert M.render_audio(s).shape == (16, 100)
    assert M.render_image(s).shape == (3, 32, 32)
    v = M.render_video(s)
    assert v.shape == (4, 3, 32, 32) and np.all(v[0] == -1.0) and not np.all(v[1] == -1.0)
    sc = M.Scene(3, True, 2, "red", "left", "circle", 5)
    assert [sc.answer(t) for t in M.JOINT] == ["3 2", "3 left", "2 left"]
    # every modality is in two of the three joint tasks, so each single expert lacks one modality in two of them
    assert all(sum(m in M.TASKS[t][0] for t in M.JOINT) == 2 for m in M.MODALITIES)
    for t in M.TASKS:
        for sc in M.make_examples(t, "validation", 5):
            assert all(w in M.VOCAB for w in sc.answer(t).split())
            assert M.UNK not in M.prompt_ids(t, sc) and M.UNK not in M.prompt_ids(t, sc, text_mods=M.MODALITIES)
    # the beeps are countable in the spectrogram: louder frames in as many bursts as beeps
    one, four = M.Scene(1, True, 1, "red", "left", "circle", 5), M.Scene(4, True, 1, "red", "left", "circle", 5)
    assert M.render_audio(four).max(0).mean() > M.render_audio(one).max(0).mean()


@pytest.mark.parametrize("modality", M.MODALITIES)
def test_composite_equals_native_forward(modality: str) -> None:
    spec = M.SuiteSpec.quick_spec()
    model = M.build(modality, spec, seed=3).eval()
    task = M.SINGLE[modality][0]
    b = M.make_batch(task, M.make_examples(task, "test", 3), with_answers=False)
    kw = {"vision": "pixel_values", "video": "pixel_values_videos", "audio": "input_features"}[modality]
    extra = {kw: b.inputs[modality]}
    if modality == "audio":
        extra["feature_attention_mask"] = torch.ones(3, 100, dtype=torch.long)
    with torch.no_grad():
        native = model(input_ids=b.ids, attention_mask=b.mask, **extra).logits
        comp = M.Composite(model, {modality: model}).logits(b.ids, b.mask, b.inputs)
    torch.testing.assert_close(comp, native, rtol=1e-4, atol=1e-5)


def test_quick_bench(tmp_path: Path) -> None:
    res = M.run_modality_bench(tmp_path / "out", methods=["task_arithmetic"], quick=True, zoo_root=tmp_path / "zoo",
                               log=lambda m: None, lambdas=(0.5, 1.0))
    names = [r["name"] for r in res["rows"]]
    assert names == ["base", "audio expert", "vision expert", "video expert", "online composition (NaiveMC)",
                     "task_arithmetic"]
    for f in ("results.json", "results.csv", "results.md"):
        assert (tmp_path / "out" / f).is_file()
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data["rows"][-1]["columns"]) == set(M.COLUMNS) and data["rows"][-1]["lambda"] in (0.5, 1.0)
    assert "| best single-modality expert |" in (tmp_path / "out" / "results.md").read_text()
