"""mergekit's tokenizer_source / tokenizer: and chat_template: the output vocabulary, every input's embedding and
LM-head rows re-indexed into it, the output's tokenizer files and chat template.

The family (``tests/vocab_family.py``): a base and two experts with tokens of their own (plain added, special
added, and an ordinary vocabulary that lacks one of the base's words). ``tests/fixtures/mergekit_vocab/`` holds
mergekit 0.1.5's outputs of the same recipes (made by ``tools/mergekit_vocab_fixture.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import vocab_family
import yaml
from safetensors.torch import load_file

from omnimerge.errors import RecipeError
from omnimerge.mergekit_format import to_mergekit, translate
from omnimerge.recipe import load_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "mergekit_vocab"
BF16_EPS = 2.0 ** -8  # one bfloat16 rounding, relative


def close_bf16(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Equal within a bfloat16 rounding: of the value, or (for entries that nearly cancel, where the order of the
    float32 sums decides) of the tensor's scale."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * BF16_EPS, atol=BF16_EPS * scale + 1e-7,
                               msg=msg or None)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vocab-family")
    vocab_family.build(root)
    return root


def _one_error(err: str) -> bool:
    """One error line (after the run's notes), no traceback."""
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in err and err.rstrip().splitlines()[-1] == errors[0]


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())


def _merge(cli: Any, family: Path, recipe: dict[str, Any], name: str) -> Path:
    p = family / f"{name}.yaml"
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = family / f"out-{name}"
    res = cli("merge", p, "-o", out, "-q", "--overwrite")
    assert res.code == 0, res.text
    return out


@pytest.mark.parametrize("case", sorted(p.name for p in FIXTURE.iterdir()))
def test_equals_mergekit_output(cli: Any, family: Path, case: str) -> None:
    """Every token's rows, every other tensor, the vocabulary, vocab_size and the chat template equal mergekit's
    output on the same recipe (token by token: mergekit numbers a union's new tokens in an unstable order)."""
    want = json.loads((FIXTURE / case / "expected.json").read_text())
    mk = load_file(str(FIXTURE / case / "model.safetensors"))
    out = _merge(cli, family, want["recipe"], case)
    got = load_file(str(out / "model.safetensors"))
    vocab = _vocab(out)
    assert set(vocab) == set(want["vocab"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == want["vocab_size"] == got["model.embed_tokens.weight"].shape[0]
    assert got.keys() == mk.keys()
    n = len(vocab)
    for k, w in mk.items():
        g = got[k].float()
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            ids, mk_ids = zip(*[(vocab[t], want["vocab"][t]) for t in vocab], strict=True)
            close_bf16(g[list(ids)], w[list(mk_ids)], k)
            close_bf16(g[n:], w[n:], f"{k}: padding rows")
        else:
            close_bf16(g, w, k)
    template = (out / "chat_template.jinja").read_text() if (out / "chat_template.jinja").exists() else None
    assert template == want["chat_template"]


def test_union_rows_come_from_the_right_inputs(cli: Any, family: Path) -> None:
    """Union, task arithmetic (lambda 0.8; weights 0.7, 0.5): a token only one expert has keeps that expert's row;
    a base token an expert lacks gives that expert the base's row; a token both experts have and the base lacks
    gives the base the experts' average. Checked against the inputs' own rows; the output loads with its class."""
    import transformers

    out = _merge(cli, family, {
        "merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8},
        "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.5}}],
        "tokenizer_source": "union", "dtype": "float32"}, "rows")
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok) == 37 == model.get_input_embeddings().weight.shape[0]
    ids = tok("w27 alpha b0 shared <|a|>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["w27", "alpha", "b0", "shared", "<|a|>"]
    assert tok.added_tokens_decoder[ov_a := tok.get_vocab()["<|a|>"]].special and ov_a == 36  # its settings kept
    assert model(torch.tensor([ids])).logits.shape == (1, 5, 37)
    inp = {n: load_file(str(family / n / "model.safetensors")) for n in ("base", "a", "b")}
    voc = {n: _vocab(family / n) for n in ("base", "a", "b")}
    got = load_file(str(out / "model.safetensors"))
    ov = tok.get_vocab()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        def row(n: str, t: str, key: str = key) -> torch.Tensor:
            return inp[n][key][voc[n][t]].float()

        def out_row(t: str, key: str = key) -> torch.Tensor:
            return got[key][ov[t]].float()

        def ta(w0: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
            return (w0 + 0.8 * (0.7 * (wa - w0) + 0.5 * (wb - w0))).bfloat16().float()

        for t in ("alpha", "<|a|>"):  # only expert a: every input takes a's row
            assert torch.equal(out_row(t), row("a", t))
        assert torch.equal(out_row("b0"), row("b", "b0"))  # only expert b
        w0 = row("base", "w27")  # b lacks it: b takes the base's row
        torch.testing.assert_close(out_row("w27"), ta(w0, row("a", "w27"), w0), rtol=BF16_EPS, atol=1e-6)
        avg = (row("a", "shared") + row("b", "shared")) / 2  # the base lacks it: the experts' average
        torch.testing.assert_close(out_row("shared"), ta(avg, row("a", "shared"), row("b", "shared")),
                                   rtol=BF16_EPS, atol=1e-6)
        torch.testing.assert_close(out_row("w3"), ta(row("base", "w3"), row("a", "w3"), row("b", "w3")),
                                   rtol=BF16_EPS, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "## Tokenizer and chat template" in card and "tokenizer: union (37 tokens, 37 embedding rows)" in card


def test_tied_embeddings_are_reindexed_once(cli: Any, tmp_path: Path) -> None:
    """A tied LM head has no tensor of its own: the embedding is re-indexed, and the output stays tied."""
    import transformers

    vocab_family.build(tmp_path, tied=True)
    out = _merge(cli, tmp_path, {
        "merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]},
        "tied")
    got = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in got and got["model.embed_tokens.weight"].shape == (37, 16)
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == \
        model.model.embed_tokens.weight.data_ptr()
    a = load_file(str(tmp_path / "a" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"][_vocab(out)["alpha"]], a[_vocab(tmp_path / "a")["alpha"]])


# --- chat templates -----------------------------------------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(("template", "rendered"), [
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"),
    ("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nhello<|eot_id|>"),
    ("mistral", "<s> [INST] hi [/INST] hello</s>"),
    ("alpaca", "### Instruction:\nhi\n\n### Response:\nhello"),
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", "<user>hi<assistant>hello"),
])
def test_chat_template_is_written_into_the_tokenizer(cli: Any, family: Path, template: str, rendered: str) -> None:
    """A named format or a literal Jinja template ends up in the output's tokenizer files: transformers renders
    it (the merge itself never renders it); the model card names it. No tokenizer setting: the base's tokenizer
    is kept (re-serialised by transformers) with the template."""
    from transformers import AutoTokenizer

    out = _merge(cli, family, {
        "merge_method": "task_arithmetic", "base_model": "base", "chat_template": template,
        "models": [{"model": "a", "parameters": {"weight": 1.0}}], "tokenizer_source": "base"}, "tmpl")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == rendered
    assert len(tok) == 32  # the base's vocabulary: a's own tokens are dropped, as mergekit does with source: base
    card = (out / "README.md").read_text()
    assert "chat template: " + (template if "{" not in template else "a Jinja template") in card


def test_chat_template_auto_takes_the_most_common(cli: Any, family: Path) -> None:
    out = _merge(cli, family, {
        "merge_method": "task_arithmetic", "base_model": "base", "chat_template": "auto", "tokenizer_source": "b",
        "models": [{"model": "b", "parameters": {"weight": 1.0}}, {"model": "a", "parameters": {"weight": 1.0}}]},
        "auto")
    assert (out / "chat_template.jinja").read_text() == vocab_family.BASE_TEMPLATE  # base and a against b


def test_bad_template_and_outside_symlink_are_refused(cli: Any, family: Path, tmp_path: Path) -> None:
    """A literal that is no template is refused in one line (mergekit's rule); a chat template that is a symlink
    to a file outside its checkpoint is refused before transformers reads it, and nothing is written."""
    base = {"merge_method": "task_arithmetic", "base_model": str(family / "base"), "tokenizer_source": "union",
            "models": [{"model": str(tmp_path / "b"), "parameters": {"weight": 1.0}}]}
    import shutil

    shutil.copytree(family / "b", tmp_path / "b")
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**base, "chat_template": "nonsense"}))
    res = cli("merge", p, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and "chat_template" in res.err and _one_error(res.err), res.err
    assert not (tmp_path / "out").exists()
    outside = tmp_path / "elsewhere.jinja"
    outside.write_text("{{ 'stolen' }}" * 3)
    (tmp_path / "b" / "chat_template.jinja").unlink()
    os.symlink(outside, tmp_path / "b" / "chat_template.jinja")
    p.write_text(yaml.safe_dump({**base, "chat_template": "auto"}))
    res = cli("merge", p, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and "outside the checkpoint folder" in res.err, res.err
    assert _one_error(res.err) and not (tmp_path / "out").exists()


# --- translation both ways, refusals --------------------------------------------------------------------------------

def test_translation_keeps_the_tokenizer_and_template() -> None:
    mk = {"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}],
          "tokenizer_source": "union", "chat_template": "llama3"}
    r, diffs = translate(mk)
    assert r["tokenizer"] == {"source": "union"} and r["chat_template"] == "llama3"
    assert "copy_files_from" not in r
    assert any("tokenizer: union" in d for d in diffs) and any("chat_template: llama3" in d for d in diffs)
    _, diffs = translate({**mk, "chat_template": "chatml"})  # renders as mergekit's file does: nothing to state
    assert not any("chat_template" in d for d in diffs)
    block = {"source": "x", "pad_to_multiple_of": 64, "tokens": {"<|im_end|>": {"source": "x", "force": True}}}
    r, _ = translate({**mk, "tokenizer_source": None, "tokenizer": block} | {"tokenizer_source": None})
    assert r["tokenizer"] == block
    r, _ = translate({k: v for k, v in mk.items() if k != "tokenizer_source"} | {"tokenizer": {"tokens": {}}})
    assert r["tokenizer"]["source"] == "union"  # mergekit's default source of a tokenizer: block


@pytest.mark.parametrize(("change", "key"), [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
    ({"tokenizer": "union"}, "tokenizer: expected a mapping"),
    ({"tokenizer_source": 3}, "tokenizer_source"),
    ({"chat_template": ["chatml"]}, "chat_template"),
])
def test_translation_refusals(change: dict[str, Any], key: str) -> None:
    data = {"base_model": "b", "merge_method": "ties", "models": [{"model": "x"}], **change}
    with pytest.raises(RecipeError) as e:
        translate({k: v for k, v in data.items() if v is not None}, "r.yaml")
    assert key in str(e.value) and "\n" not in str(e.value)


def test_to_mergekit_writes_the_tokenizer_block_and_template(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "x"}],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {"<t>": {"source": {"kind": "zero"}}}},
        "chat_template": "llama3"}))
    out, _ = to_mergekit(load_recipe(p))
    assert out["tokenizer"] == {"source": "union", "pad_to_multiple_of": 8,
                                "tokens": {"<t>": {"source": {"kind": "zero"}}}}
    assert "tokenizer_source" not in out and out["chat_template"] == "llama3"
    back, _ = translate(out)
    assert back["tokenizer"] == out["tokenizer"] and back["chat_template"] == "llama3"


@pytest.mark.parametrize(("tokenizer", "needle"), [
    ({"source": "base", "tokens": {"alpha": {"source": "nobody"}}}, "not one of the recipe's models"),
    ({"source": "base", "tokens": {"alpha": {"source": "b"}}}, "has no token"),
    ({"source": "base", "tokens": {"x": {"source": {"kind": "model_token", "model": "b", "token": "zz"}}}},
     "has no token"),
    ({"source": "missing-model"}, "tokenizer.source"),
])
def test_bad_token_sources_are_refused(cli: Any, family: Path, tokenizer: dict[str, Any], needle: str) -> None:
    p = family / "bad.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "base", "tokenizer": tokenizer,
                                 "models": [{"model": "b", "parameters": {"weight": 1.0}}]}))
    res = cli("merge", p, "-o", family / "out-bad", "-q")
    assert res.code == 2 and needle in res.err and _one_error(res.err), res.err
    assert not (family / "out-bad").exists()


def test_tokenizer_with_lora_output_is_refused(cli: Any, family: Path) -> None:
    """A new vocabulary is built for one full merged model: a LoRA output (or modality merging) is refused
    before any work."""
    p = family / "lora.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "base", "output": "lora",
                                 "rank": 2, "tokenizer": {"source": "union"},
                                 "models": [{"model": "b", "parameters": {"weight": 1.0}}]}))
    res = cli("merge", p, "-o", family / "out-lora", "-q")
    assert res.code == 2 and "tokenizer:" in res.err and _one_error(res.err), res.err
    assert not (family / "out-lora").exists()


def test_base_source_without_tokenizers_merges_as_before(cli: Any, tmp_path: Path) -> None:
    """`tokenizer_source: base` (what `omnimerge convert --to mergekit` writes) over inputs without tokenizers and
    with one vocabulary size re-indexes nothing: the merge is the plain one, and says so."""
    from omnimerge.examples import build_family

    base, (a,) = build_family(tmp_path / "fam", arch="qwen2", n_experts=1)
    rec = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": "base",
           "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    outs = []
    for name, r in (("with", rec), ("without", {k: v for k, v in rec.items() if k != "tokenizer_source"})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
        res = cli("merge", tmp_path / f"{name}.yaml", "-o", tmp_path / name, "--format", "mergekit")
        assert res.code == 0, res.text
        assert ("no input has a tokenizer" in res.text) == (name == "with")
        outs.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_every_strategy_reads_the_reindexed_inputs(family: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-indexing is a transform of the inputs: the block-streamed path (which tiny tensors reach with a
    small block), the whole-tensor path and the in-memory merge give the same bits."""
    import omnimerge
    import omnimerge.engine
    from omnimerge.options import MergeOptions

    monkeypatch.setattr(omnimerge.engine, "FUSED_BLOCK", 128)
    streamed = "fused"
    rec = {"merge_method": "task_arithmetic", "base_model": str(family / "base"), "tokenizer": {"source": "union"},
           "select": {"include": [".*"]}, "parameters": {"scaling": 0.5},
           "models": [{"model": str(family / m), "parameters": {"weight": 1.0}} for m in ("a", "b")]}
    outs = {}
    for strategy in ("auto", "whole"):
        rep = omnimerge.merge(rec, tmp_path / strategy, options=MergeOptions(strategy=strategy, progress=False))
        assert (streamed in rep.strategies) == (strategy == "auto"), rep.strategies
        outs[strategy] = load_file(str(tmp_path / strategy / "model.safetensors"))
    mem = omnimerge.merge_state_dict(rec)
    assert outs["auto"]["model.embed_tokens.weight"].shape == (37, 16)
    for k, w in outs["whole"].items():
        assert torch.equal(outs["auto"][k], w) and torch.equal(mem[k].to(w.dtype), w), k


def test_named_templates_render_as_mergekits_up_to_stated_whitespace() -> None:
    """omnimerge's text of each format mergekit names, rendered by transformers, against mergekit 0.1.5's own files
    rendered on the same conversations (stored by tools/mergekit_vocab_fixture.py): chatml and mistral render
    the same; llama3, alpaca and exaone differ in whitespace only, as the stated difference says."""
    from omnimerge.checkpoint.vocabulary import CHAT_TEMPLATES
    from omnimerge.mergekit_format import TEMPLATES_RENDERED_OTHERWISE as OTHERWISE

    stored = json.loads((FIXTURE.parent / "mergekit_chat_templates.json").read_text())
    tok = vocab_family.tokenizers()["base"]
    assert set(stored["renders"]) == set(CHAT_TEMPLATES)
    for name, theirs in stored["renders"].items():
        mine = [tok.apply_chat_template(c, chat_template=CHAT_TEMPLATES[name], tokenize=False,
                                        add_generation_prompt=g)
                for g in (False, True) for c in stored["conversations"]]
        if name in OTHERWISE:
            assert mine != theirs and ["".join(x.split()) for x in mine] == ["".join(x.split()) for x in theirs]
        else:
            assert mine == theirs, name


def test_an_embedding_smaller_than_its_vocabulary_is_refused(cli: Any, family: Path, tmp_path: Path) -> None:
    """An expert whose config declares more tokens than its embedding has rows is refused before any work (its
    rows could not be indexed), in one line naming the tensor."""
    import shutil

    shutil.copytree(family / "b", tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 40}))
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(family / "base"),
                                 "tokenizer": {"source": "union"}, "select": {"include": [".*"]},
                                 "models": [{"model": str(tmp_path / "b"), "parameters": {"weight": 1.0}}]}))
    res = cli("merge", p, "-o", tmp_path / "out", "-q")
    assert res.code == 2 and "has 34 rows, fewer than the 40 tokens" in res.err, res.err
    assert "lm_head.weight" in res.err or "embed_tokens.weight" in res.err
    assert _one_error(res.err) and not (tmp_path / "out").exists()


def test_union_on_a_multimodal_model(cli: Any, tmp_path: Path) -> None:
    """LLaVA: the language model's embedding and head (under ``model.language_model`` / ``lm_head``) are
    re-indexed, ``text_config.vocab_size`` follows, and the output loads with its class."""
    import transformers

    from omnimerge.examples import VOCAB, build_base

    words = [f"w{i}" for i in range(VOCAB - 4)]
    for name, extra in (("base", []), ("x", ["<|box|>", "<|ocr|>"])):
        model = build_base("llava")
        tok = vocab_family._tokenizer(words, vocab_family.BASE_TEMPLATE)
        if extra:
            tok.add_tokens(extra)
            model.resize_token_embeddings(len(tok))
            with torch.no_grad():
                model.get_input_embeddings().weight[-2:] = torch.randn(2, model.config.text_config.hidden_size)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = _merge(cli, tmp_path, {
        "merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "union",
        "models": [{"model": "x", "parameters": {"weight": 1.0}}]}, "llava")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == VOCAB + 2
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == VOCAB + 2 and model.lm_head.weight.shape[0] == VOCAB + 2
    x = load_file(str(tmp_path / "x" / "model.safetensors"))
    key = next(k for k in x if k.endswith("embed_tokens.weight"))
    for t in ("<|box|>", "<|ocr|>"):  # only x has them: its rows
        assert torch.equal(emb[tok.convert_tokens_to_ids(t)].detach(), x[key][_vocab(tmp_path / "x")[t]])
