"""Make the stored fixture of mergekit 0.1.5's tokenizer merges (``tests/fixtures/mergekit_vocab/``).

Builds the tiny family of ``tests/vocab_family.py`` (experts with vocabularies of their own), runs
``mergekit-yaml`` from its own environment on each recipe of ``CASES``, and stores, per case, mergekit's output
weights (``model.safetensors``), its tokenizer's ``token -> id`` map and ``config.json``'s ``vocab_size``, and
the chat template it wrote; and mergekit's named chat templates rendered on a few conversations
(``tests/fixtures/mergekit_chat_templates.json``). ``tests/test_mergekit_tokenizer.py`` merges the same recipes with omnimerge and
compares, token by token (mergekit numbers a union's new tokens in an order that can change between runs).
CI never runs this (it needs mergekit); rerun it after changing the family or the cases:

    /work/main/.venv/bin/python tools/mergekit_vocab_fixture.py --mergekit /tmp/omnimerge-perf/mergekit-venv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mergekit_vocab"

#: case -> mergekit recipe over the family's folders base, a, b (relative to the family's root)
CASES: dict[str, dict] = {
    "union": {
        "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32", "out_dtype": "bfloat16",
        "parameters": {"lambda": 0.8},
        "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.5}}],
        "tokenizer_source": "union",
    },
    "base_tokens": {
        "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}],
        "tokenizer": {
            "source": "base", "pad_to_multiple_of": 8,
            "tokens": {
                "alpha": {"source": "a"},
                "w5": {"source": {"kind": "model_token", "model": "b", "token": "b0"}, "force": True},
                "<|new|>": {"source": {"kind": "zero"}},
            },
        },
    },
    "model_auto_template": {
        "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}],
        "tokenizer_source": "b", "chat_template": "auto",
    },
}


#: conversations mergekit's named chat templates are rendered on (``tests/fixtures/mergekit_chat_templates.json``)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": " hi "}],
]


def render_named_templates(mergekit_yaml: str, tokenizer: object) -> dict[str, list[str]]:
    """mergekit's own named chat templates (its package's ``_data/chat_templates/*.jinja``), rendered by
    transformers on :data:`CONVERSATIONS`, without and with the generation prompt."""
    lib = Path(mergekit_yaml).resolve().parents[1] / "lib"
    folder = next(lib.glob("python3*/site-packages/mergekit/_data/chat_templates"))
    out = {}
    for f in sorted(folder.glob("*.jinja")):
        out[f.stem] = [tokenizer.apply_chat_template(c, chat_template=f.read_text(), tokenize=False,  # type: ignore[attr-defined]
                                                      add_generation_prompt=g)
                       for g in (False, True) for c in CONVERSATIONS]
    return out


def with_paths(node: object, fam: Path) -> object:
    """A recipe with the family's model names (base, a, b) as absolute paths (mergekit takes a bare name for a
    hub id)."""
    if isinstance(node, dict):
        return {k: (str(fam / v) if k in ("model", "base_model", "source", "tokenizer_source")
                    and v in ("base", "a", "b") else with_paths(v, fam)) for k, v in node.items()}
    if isinstance(node, list):
        return [with_paths(v, fam) for v in node]
    return node


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="the mergekit-yaml executable of mergekit's environment")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import vocab_family

    with tempfile.TemporaryDirectory() as tmp:
        fam = Path(tmp)
        vocab_family.build(fam)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
        for case, recipe in CASES.items():
            (fam / f"{case}.yml").write_text(yaml.safe_dump(with_paths(recipe, fam), sort_keys=False))
            out = fam / f"out-{case}"
            subprocess.run([args.mergekit, f"{case}.yml", str(out), "--random-seed", "0"], cwd=fam, env=env,
                           check=True)
            dst = FIXTURE / case
            dst.mkdir(parents=True, exist_ok=True)
            (dst / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
            tok = json.loads((out / "tokenizer.json").read_text())
            vocab = dict(tok["model"]["vocab"])
            vocab.update({a["content"]: a["id"] for a in tok.get("added_tokens", [])})
            cfg = json.loads((out / "config.json").read_text())
            template = (out / "chat_template.jinja").read_text() if (out / "chat_template.jinja").exists() else None
            (dst / "expected.json").write_text(json.dumps(
                {"recipe": recipe, "vocab": vocab, "vocab_size": cfg["vocab_size"], "chat_template": template},
                indent=1, sort_keys=True) + "\n")
            print(f"{case}: {len(vocab)} tokens, vocab_size {cfg['vocab_size']} -> {dst}")
    renders = render_named_templates(args.mergekit, vocab_family.tokenizers()["base"])
    (FIXTURE.parent / "mergekit_chat_templates.json").write_text(json.dumps(
        {"conversations": CONVERSATIONS, "renders": renders}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
