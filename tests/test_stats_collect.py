"""``omnimerge stats``: Grams and token counts against a direct computation (hooks on unpadded forwards), the
Fisher against autograd, the stats -> regmean round trip through the CLI, and the calibration checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from omnimerge.stats import Batch, collect_fisher, collect_grams


def _llama(seed: int = 0) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    return T.LlamaForCausalLM(cfg).eval()


SEQS = [[5, 9, 3, 7, 11, 2], [4, 8, 6], [13, 1, 12, 10]]


def _padded() -> Batch:
    width = max(map(len, SEQS))
    ids = torch.zeros(len(SEQS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(SEQS):  # right padding: the real tokens' activations do not see the pads
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return Batch({"input_ids": ids, "attention_mask": mask})


def test_grams_and_token_counts_equal_unpadded_forwards_with_hooks() -> None:
    model = _llama()
    res = collect_grams(model, [_padded()])
    # direct: each sequence alone (no padding at all), every linear's input rows summed
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=name):  # type: ignore[no-untyped-def]
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                rows[name] = rows.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for s in SEQS:
            model(input_ids=torch.tensor([s]))
    for h in hooks:
        h.remove()
    assert set(res.tensors) == {f"{n}.weight" for n in sums}
    total = sum(map(len, SEQS))
    for name, g in sums.items():
        assert rows[name] == total
        torch.testing.assert_close(res.tensors[f"{name}.weight"].double(), g / total, rtol=1e-5, atol=1e-6)
    sites = res.manifest["sites"]
    assert set(res.manifest["tokens"].values()) == {total}
    # q/k/v share one input site, gate/up another: one accumulator each
    assert sites["model.layers.0.self_attn.q_proj.in"] == [f"model.layers.0.self_attn.{p}_proj.weight"
                                                            for p in "qkv"]
    assert sites["model.layers.1.mlp.gate_proj.in"] == ["model.layers.1.mlp.gate_proj.weight",
                                                         "model.layers.1.mlp.up_proj.weight"]
    assert "model.layers.0.self_attn.o_proj.in" in sites and len(sites) == 2 * 4 + 1  # + lm_head


def test_empirical_fisher_equals_squared_gradients_per_example() -> None:
    model = _llama()
    examples = []
    for s in SEQS:
        ids = torch.tensor([s])
        labels = ids.clone()
        labels[0, :2] = -100  # the "prompt" takes no loss
        examples.append(Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels))
    res = collect_fisher(model, examples, mode="empirical", include=r"layers\.1\.mlp")
    want: dict[str, torch.Tensor] = {}
    for ex in examples:
        model.zero_grad()
        logits = model(**ex.inputs).logits[0, :-1]
        tgt = ex.labels[0, 1:]
        loss = torch.nn.functional.cross_entropy(logits[tgt != -100], tgt[tgt != -100], reduction="sum")
        loss.backward()
        for n, p in model.named_parameters():
            if "layers.1.mlp" in n:
                want[n] = want.get(n, 0) + p.grad.double() ** 2
    assert set(res.tensors) == set(want)
    for n, w in want.items():
        torch.testing.assert_close(res.tensors[n].double(), w / len(examples), rtol=1e-4, atol=1e-12)
    true = collect_fisher(model, examples, mode="true", include=r"layers\.1\.mlp", seed=1)
    assert set(true.tensors) == set(want) and not torch.allclose(true.tensors[n], res.tensors[n])


@pytest.fixture(scope="module")
def bench_experts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A miniature-suite base and two experts (perturbed copies), saved as checkpoints."""
    from omnimerge.bench.model import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("bench")
    out = []
    for i in range(3):
        m = build_model(seed=0)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        out.append(save_checkpoint(m, root / f"m{i}"))
    return out


def test_stats_then_regmean_round_trip(bench_experts: list[Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    base, *experts = bench_experts
    files = []
    for i, e in enumerate(experts):
        f = tmp_path / f"s{i}.safetensors"
        res = cli("stats", e, "--calib", "bench:vqa", "--n", "4", "--batch-size", "4", "-o", f)
        assert res.code == 0, res.text
        files.append(f)
    with safe_open(str(files[0]), "pt") as sf:
        meta = sf.metadata()
    man = json.loads(meta["manifest"])
    assert meta["statistic"] == "regmean_gram" and man["split"] == "train" and man["weights_digest"]
    recipe = {"base_model": str(base), "merge_method": "regmean", "parameters": {"reduce_non_diagonal_ratio": 0.9},
              "models": [{"model": str(e), "statistics": str(f)} for e, f in zip(experts, files, strict=True)]}
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    res = cli("merge", rp, "-o", tmp_path / "out", "-q")
    assert res.code == 0, res.text
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    ws = [load_file(str(e / "model.safetensors"))[name].double() for e in experts]
    gs = [0.9 * g + 0.1 * torch.diag(torch.diagonal(g))
          for g in (load_file(str(f))[name].double() for f in files)]
    torch.testing.assert_close(got[name].double() @ sum(gs), sum(w @ g for w, g in zip(ws, gs, strict=True)),
                               rtol=1e-4, atol=1e-5)
    # the statistics of expert 1 given for expert 0: refused by the recorded digest, nothing written
    recipe["models"][0]["statistics"], recipe["models"][1]["statistics"] = str(files[1]), str(files[0])
    rp.write_text(yaml.safe_dump(recipe))
    res = cli("merge", rp, "-o", tmp_path / "out2", "-q")
    assert res.code == 2 and "collected on other weights" in res.text and len(res.text.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_a_vlm_with_a_text_only_calibration_set_is_refused(bench_experts: list[Path], tmp_path: Path,
                                                           cli) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "what color is the shape ?", "answer": "red"})
                              for _ in range(3)))
    res = cli("stats", bench_experts[1], "--calib", data, "-o", tmp_path / "s.safetensors")
    assert res.code == 2, res.text
    assert "no row has an image" in res.text and "vision-language" in res.text
    assert len(res.text.strip().splitlines()) == 1 and not (tmp_path / "s.safetensors").exists()
    res = cli("stats", bench_experts[1], "--calib", "bench:nosuch", "-o", tmp_path / "s.safetensors")
    assert res.code == 2 and "unknown task 'nosuch'" in res.text


def test_regmean_plusplus_grams_come_from_the_merged_earlier_layers() -> None:
    """Layer 0 sees the same inputs as plain RegMean (the experts differ only inside the layers); layer 1's
    Grams equal those of a model whose layer 0 is the RegMean solve of layer 0 (computed here with
    torch.linalg.solve) and whose layer 1 is the expert's own, and differ from plain RegMean's."""
    from omnimerge.stats.plusplus import regmean_plusplus_grams

    base = _llama(0)
    experts = []
    for i in (1, 2):
        e = _llama(0)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in e.named_parameters():
                if ".layers." in n:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        experts.append(e)
    data = [[_padded()], [Batch({"input_ids": torch.tensor([[3, 4, 5, 6, 7]]),
                                 "attention_mask": torch.ones(1, 5, dtype=torch.long)})]]
    alpha = 0.8
    pp = regmean_plusplus_grams(base, experts, data, alpha=alpha)
    plain = [collect_grams(e, d).tensors for e, d in zip(experts, data, strict=True)]
    l0 = [n for n in plain[0] if ".layers.0." in n]
    l1 = [n for n in plain[0] if ".layers.1." in n]
    assert set(pp[0].tensors) == set(l0) | set(l1)
    for t in range(2):
        for n in l0:
            torch.testing.assert_close(pp[t].tensors[n], plain[t][n], rtol=1e-5, atol=1e-7)

    def red(g: torch.Tensor) -> torch.Tensor:
        g = g.double()
        return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))

    merged0 = {}
    for n in l0:
        s = sum(red(p.tensors[n]) for p in pp)
        rhs = sum(dict(e.named_parameters())[n].detach().double() @ red(p.tensors[n]) for e, p in zip(experts, pp, strict=True))
        merged0[n] = torch.linalg.solve(s, rhs.T).T.float()  # W s = rhs, s symmetric
    for t, e in enumerate(experts):
        own = {k: v.clone() for k, v in e.state_dict().items()}
        hybrid = {k: (base.state_dict()[k] if ".layers.1." not in k else v) for k, v in own.items()}
        hybrid.update(merged0)
        e.load_state_dict(hybrid)
        want = collect_grams(e, data[t], include=r"layers\.1\.").tensors
        e.load_state_dict(own)
        for n in l1:
            torch.testing.assert_close(pp[t].tensors[n], want[n], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(pp[t].tensors[l1[0]], plain[t][l1[0]], atol=1e-4)


def test_stats_plusplus_cli_writes_regmean_files(bench_experts: list[Path], tmp_path: Path,
                                                 cli) -> None:  # type: ignore[no-untyped-def]
    base, *experts = bench_experts
    res = cli("stats-plusplus", base, *experts, "--calib", "bench:vqa", "--calib", "bench:chart", "--n", "2",
              "--alpha", "0.9", "-o", tmp_path / "pp")
    assert res.code == 0, res.text
    files = sorted((tmp_path / "pp").glob("*.safetensors"))
    assert [f.stem for f in files] == [e.name for e in experts]
    with safe_open(str(files[0]), "pt") as sf:
        man = json.loads(sf.metadata()["manifest"])
        keys = list(sf.keys())
    assert man["regmean_plusplus"] is True and man["reduce_non_diagonal_ratio"] == 0.9
    assert all(".layers." in k and "vision" not in k for k in keys)  # the language model's layers only
    recipe = {"base_model": str(base), "merge_method": "regmean", "parameters": {"reduce_non_diagonal_ratio": 0.9},
              "models": [{"model": str(e), "statistics": str(f)} for e, f in zip(experts, files, strict=True)]}
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    assert cli("merge", rp, "-o", tmp_path / "out", "-q").code == 0
