"""AdaMerging (``omnimerge adamerge``): the entropy gradient against finite differences, a step lowers the entropy,
the written recipe merged by the engine equals the functional merge the optimiser evaluated, labels are never
read, determinism under a seed, and the command's checks (data before the model, one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from omnimerge.adamerging import FunctionalMerge, adamerge, entropy_loss, learned_recipe
from omnimerge.api import as_recipe, merge_state_dict
from omnimerge.stats.data import jsonl_batches, read_rows
from tests.tiny_vlms import save_family, save_tiny_vlm

SELECT = {"include": ["language_model", "vision_tower", "projector"]}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("ada")
    base = save_tiny_vlm("llava", root / "base")
    return base, save_family(base, root, n=2, scale=0.5)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL of prompts with images and answers, and its twin without the answers."""
    root = tmp_path_factory.mktemp("ada-data")
    rows = []
    for i, (color, word) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green"),
                                       ((200, 200, 0), "yes")]):
        Image.new("RGB", (32, 32), color).save(root / f"im{i}.png")
        rows.append({"prompt": "what is the color of the box ?" if i % 2 else "what color is this image ?",
                     "images": [f"im{i}.png"], "answer": word})
    (root / "with.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "without.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "answer"})
                                                  for r in rows))
    return root


def _recipe(base: Path, experts: list[Path], dtype: str = "float32") -> dict:  # type: ignore[type-arg]
    return {"base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "merge_method": "task_arithmetic", "select": SELECT, "dtype": dtype}


def _loaded(base: Path):  # type: ignore[no-untyped-def]
    from omnimerge.eval.models import load_model

    return load_model(base)


def _batches(path: Path, loaded, batch_size: int = 2) -> list:  # type: ignore[no-untyped-def, type-arg]
    return list(jsonl_batches(path, loaded.processor, loaded.config, n=None, batch_size=batch_size, what="base",
                              prompts_only=True))


def test_entropy_gradient_equals_finite_differences(family, images,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """In float64 end to end: transformers' RMSNorm computes in float32 whatever its input, which would put
    float32 rounding into the finite differences, so here it keeps its input's dtype."""
    import transformers.models.llama.modeling_llama as llama

    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm)
    base, experts = family
    loaded = _loaded(base)
    model = loaded.model.double()
    batch = _batches(images / "without.jsonl", loaded, batch_size=4)[0]
    ins = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    fm = FunctionalMerge(as_recipe(_recipe(base, experts, "float64")), model, "layer")
    assert fm.shape == (2, 3)  # two decoder layers + other
    lam0 = torch.tensor([[0.2, 0.5, 0.35], [0.45, 0.25, 0.6]], dtype=torch.float64)

    def f(lam: torch.Tensor) -> torch.Tensor:
        return entropy_loss(model, fm.merged(lam), ins, answer_tokens=2)

    lam = lam0.clone().requires_grad_(True)
    f(lam).backward()
    eps = 1e-4
    fd = torch.zeros_like(lam0)
    with torch.no_grad():
        for i in range(2):
            for j in range(3):
                d = torch.zeros_like(lam0)
                d[i, j] = eps
                fd[i, j] = (f(lam0 + d) - f(lam0 - d)) / (2 * eps)
    assert fd.abs().max() > 1e-4  # the coefficients do move the entropy
    torch.testing.assert_close(lam.grad, fd, rtol=1e-5, atol=1e-8)


def test_a_step_lowers_the_entropy_and_the_engine_merges_what_was_evaluated(family, images) -> None:  # type: ignore[no-untyped-def]
    base, experts = family
    loaded = _loaded(base)
    recipe = as_recipe(_recipe(base, experts))
    data = [_batches(images / "without.jsonl", loaded, batch_size=4)]  # one batch: the adaptation batch
    fm = FunctionalMerge(recipe, loaded.model, "layer")
    res = adamerge(recipe, loaded.model, data, steps=1, lr=0.05, granularity="layer", functional=fm)
    before, after = res.info["entropy_first_batches"]
    assert after < before
    assert not torch.allclose(res.coefficients, torch.full_like(res.coefficients, 0.3))
    assert ((res.coefficients >= 0) & (res.coefficients <= 1)).all()
    # the written recipe, merged by the streaming engine, is the functional merge the optimiser evaluated
    w = res.recipe["models"][0]["parameters"]["weight"]
    assert set(w) == {"layers", "other"} and len(w["layers"]) == 2
    engine = merge_state_dict(res.recipe, progress=False)
    functional = fm.merged(res.coefficients)
    assert len(functional) == len(fm.base) > 0
    for name in fm.base:
        torch.testing.assert_close(engine[name], functional[fm.param_of[name]], rtol=0, atol=1e-6)
    # Adam's first step moves every coefficient by +-lr: distinct coefficients check every group's place too
    lam = torch.rand(fm.shape, generator=torch.Generator().manual_seed(3))
    at_lam = merge_state_dict(learned_recipe(recipe, fm.weights(lam)), progress=False)
    functional = fm.merged(lam)
    for name in fm.base:
        torch.testing.assert_close(at_lam[name], functional[fm.param_of[name]], rtol=0, atol=1e-6)
    with torch.no_grad():  # the engine's merge, loaded into the model, has the entropy reported as learned
        sd = loaded.model.state_dict()
        loaded.model.load_state_dict({**sd, **{fm.param_of[n]: t for n, t in engine.items() if n in fm.param_of}})
        ent = entropy_loss(loaded.model, {}, data[0][0].inputs)
    assert abs(float(ent) - after) < 1e-5


def test_task_wise_is_deterministic_and_never_reads_labels(family, images) -> None:  # type: ignore[no-untyped-def]
    base, experts = family
    loaded = _loaded(base)
    recipe = as_recipe(_recipe(base, experts))
    fm = FunctionalMerge(recipe, loaded.model, "task")

    def run(name: str, seed: int) -> torch.Tensor:
        data = [_batches(images / name, loaded, batch_size=1)]  # four batches: the seed orders them
        return adamerge(recipe, loaded.model, data, steps=6, lr=0.02, seed=seed, functional=fm).coefficients

    a = run("without.jsonl", 0)
    assert a.shape == (2, 1)
    assert torch.equal(a, run("without.jsonl", 0))  # same seed, same coefficients
    assert torch.equal(a, run("with.jsonl", 0))  # answers in the file: never read
    assert not torch.equal(a, run("without.jsonl", 1))  # another seed: another batch order
    # labels handed in anyway are ignored
    data = [_batches(images / "without.jsonl", loaded, batch_size=1)]
    for b in data[0]:
        b.labels = torch.full_like(b.inputs["input_ids"], 7)
    assert torch.equal(a, adamerge(recipe, loaded.model, data, steps=6, lr=0.02, seed=0, functional=fm).coefficients)


def test_cli_learns_writes_and_merges(family, images, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    base, experts = family
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(_recipe(base, experts)))
    out = tmp_path / "sub" / "learned.yaml"
    res = cli("adamerge", rp, "--data", images / "without.jsonl", "--data", images / "with.jsonl", "--steps", "3",
              "--lr", "0.05", "--batch-size", "2", "-o", out, "--merge", tmp_path / "merged")
    assert res.code == 0, res.text
    learned = yaml.safe_load(out.read_text())
    assert learned["merge_method"] == "task_arithmetic" and learned["parameters"]["scaling"] == 1.0
    ws = [m["parameters"]["weight"] for m in learned["models"]]
    assert all(isinstance(w, float) and 0 <= w <= 1 and w != 0.3 for w in ws)
    assert "entropy" in out.read_text().splitlines()[1]
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = merge_state_dict(learned, progress=False)
    assert all(torch.equal(got[k], want[k]) for k in want)
    res = cli("adamerge", rp, "--data", images / "without.jsonl", "-o", out)  # exists, no --overwrite
    assert res.code == 2 and "already exists" in res.text


def test_cli_checks_data_before_any_model_loads(family, images, tmp_path: Path, cli,  # type: ignore[no-untyped-def]
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import omnimerge.eval.models as models

    def no_model(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    base, experts = family
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(_recipe(base, experts)))
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps({"prompt": "what color is the box ?"}) + "\n")
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(json.dumps({"question": "no prompt"}) + "\n")
    cases = [(["--data", "bench:nosuch"], "unknown task 'nosuch'"),
             (["--data", "bench:vqa", "--split", "dev"], "--split: expected one of"),
             (["--data", tmp_path / "missing.jsonl"], "missing.jsonl"),
             (["--data", bad_row], "expected an object with a 'prompt' string"),
             (["--data", text_only], "no row has an image"),
             (["--data", text_only, "--granularity", "block"], "--granularity: expected task or layer")]
    for args, msg in cases:
        res = cli("adamerge", rp, *args, "-o", tmp_path / "o.yaml")
        assert res.code == 2 and msg in res.text, (args, res.text)
        assert len(res.text.strip().splitlines()) == 1 and "Traceback" not in res.text
    rp.write_text(yaml.safe_dump({**_recipe(base, experts), "merge_method": "ties"}))
    res = cli("adamerge", rp, "--data", "bench:vqa", "-o", tmp_path / "o.yaml")
    assert res.code == 2 and "learns task-arithmetic coefficients" in res.text
    assert not (tmp_path / "o.yaml").exists()
    assert read_rows(images / "with.jsonl")[0]["answer"] == "red"  # the fixture does carry answers


def test_modifiers_are_kept_and_the_engine_still_merges_what_was_evaluated(family, images) -> None:  # type: ignore[no-untyped-def]
    """TIES's trim (per expert) and LiNeS (linear in the merged task vector) in the recipe: the optimiser sees the
    trimmed task vectors, and the written recipe, modifiers included, merges to the functional merge."""
    base, experts = family
    loaded = _loaded(base)
    recipe = as_recipe({**_recipe(base, experts), "modifiers": [{"magnitude": {"density": 0.3}},
                                                                {"lines": {"alpha": 0.5, "beta": 0.5}}]})
    fm = FunctionalMerge(recipe, loaded.model, "layer")
    name = next(n for n in fm.base if n.endswith("layers.1.mlp.down_proj.weight"))
    kept = (fm.task_vectors[0][name] != 0).double().mean()
    assert 0.25 < kept <= 0.31
    data = [_batches(images / "without.jsonl", loaded, batch_size=4)]
    res = adamerge(recipe, loaded.model, data, steps=2, lr=0.05, granularity="layer", functional=fm)
    assert [list(m) for m in res.recipe["modifiers"]] == [["magnitude"], ["lines"]]
    engine = merge_state_dict(res.recipe, progress=False)
    functional = fm.merged(res.coefficients)
    for n in fm.base:
        torch.testing.assert_close(engine[n], functional[fm.param_of[n]], rtol=0, atol=1e-6)
    lam = torch.rand(fm.shape, generator=torch.Generator().manual_seed(4))
    engine = merge_state_dict(learned_recipe(recipe, fm.weights(lam)), progress=False)
    functional = fm.merged(lam)
    for n in fm.base:
        torch.testing.assert_close(engine[n], functional[fm.param_of[n]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "internvl"])
def test_other_vlm_families_with_several_answer_tokens(family_name: str, tmp_path: Path) -> None:
    """M-RoPE (Qwen2-VL: per-token type ids grow with the decoded tokens) and InternVL, prompts of several lengths
    (left padding), the entropy over two answer tokens: it falls, and the engine merges what was evaluated."""
    base = save_tiny_vlm(family_name, tmp_path / "base")
    experts = save_family(base, tmp_path, n=2, scale=0.5)
    rows = []
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 40, 200 - 60 * i)).save(tmp_path / f"im{i}.png")
        rows.append({"prompt": "what color is this image ?" + " the" * i, "images": [f"im{i}.png"]})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = _loaded(base)
    data = [_batches(tmp_path / "d.jsonl", loaded, batch_size=3)]
    assert not bool(data[0][0].inputs["attention_mask"][:, 0].all())  # left-padded rows
    recipe = as_recipe(_recipe(base, experts))
    fm = FunctionalMerge(recipe, loaded.model, "layer")
    res = adamerge(recipe, loaded.model, data, steps=2, lr=0.05, granularity="layer", answer_tokens=2, functional=fm)
    before, after = res.info["entropy_first_batches"]
    assert after < before
    lam = torch.rand(fm.shape, generator=torch.Generator().manual_seed(5))
    engine = merge_state_dict(learned_recipe(recipe, fm.weights(lam)), progress=False)
    functional = fm.merged(lam)
    for n in fm.base:
        torch.testing.assert_close(engine[n], functional[fm.param_of[n]], rtol=0, atol=1e-6)
