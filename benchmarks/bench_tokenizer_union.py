"""A union-vocabulary merge (mergekit's ``tokenizer_source: union``): time and peak RSS, against the same merge
without a tokenizer setting, and optionally against mergekit.

    python benchmarks/bench_tokenizer_union.py                      # vocab 32000, hidden 1024, 2 experts
    python benchmarks/bench_tokenizer_union.py --with-mergekit /tmp/omnimerge-perf/mergekit-venv/bin/mergekit-yaml

Synthetic Llama checkpoints (bf16, 2 layers, untied LM head) with word-level tokenizers: the base has ``--vocab``
tokens; expert ``a`` adds ``--added`` plain and 8 special tokens; expert ``b`` replaces ``--added`` of the base's
words with its own ordinary tokens and adds ``--added`` plain tokens (half of them shared with ``a``); experts ``c`` and ``d``
have the base's vocabulary (the baseline merge). Each run is
its own child process (its own ``ru_maxrss``); inputs are read once first (warm page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(root: Path, vocab: int, hidden: int, added: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    transformers.utils.logging.set_verbosity_error()

    def tok(words: list[str]) -> PreTrainedTokenizerFast:
        tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")

    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(vocab - 2)]
    toks = {"base": tok(words), "a": tok(words), "b": tok(words[:-added] + [f"b{i}" for i in range(added)]),
            "c": tok(words), "d": tok(words)}
    toks["a"].add_tokens([f"x{i}" for i in range(added)])
    toks["a"].add_special_tokens({"additional_special_tokens": [f"<|s{i}|>" for i in range(8)]})
    toks["b"].add_tokens([f"x{i}" for i in range(added // 2)] + [f"y{i}" for i in range(added // 2)])
    for i, (name, t) in enumerate(toks.items()):
        cfg = transformers.LlamaConfig(vocab_size=len(t), hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                                       tie_word_embeddings=False)
        torch.manual_seed(i)
        m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        m.save_pretrained(root / name)
        t.save_pretrained(root / name)


def child(recipe: str, out: str) -> None:
    import omnimerge

    t0 = time.perf_counter()
    omnimerge.merge(recipe, out, overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--added", type=int, default=1000)
    ap.add_argument("--with-mergekit", metavar="MERGEKIT_YAML", help="also time mergekit-yaml on the union recipe")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    import yaml

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.vocab, args.hidden, args.added)
        for p in root.rglob("*.safetensors"):
            p.read_bytes()
        rec = {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "dtype": "float32",
               "parameters": {"lambda": 0.5},
               "models": [{"model": str(root / m), "parameters": {"weight": 1.0}} for m in ("a", "b")]}
        plain = {**rec, "models": [{"model": str(root / m), "parameters": {"weight": 1.0}} for m in ("c", "d")]}
        results = {}
        for name, r in (("union", {**rec, "tokenizer_source": "union"}), ("no tokenizer (same-size inputs)", plain)):
            (root / "r.yaml").write_text(yaml.safe_dump(r))
            res = subprocess.run([sys.executable, __file__, "--child", str(root / "r.yaml"), str(root / "out")],
                                 env=env, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{name}: {res.stderr.strip()[-2000:]}")
            results[name] = json.loads(res.stdout.strip().splitlines()[-1])
        if args.with_mergekit:
            (root / "mk.yaml").write_text(yaml.safe_dump({**rec, "tokenizer_source": "union"}))
            t0 = time.perf_counter()
            res = subprocess.run(["/usr/bin/time", "-f", "%M", args.with_mergekit, str(root / "mk.yaml"),
                                  str(root / "mk-out")], env=env, capture_output=True, text=True, check=True)
            results["mergekit union"] = {"seconds": time.perf_counter() - t0,
                                         "max_rss_mb": int(res.stderr.strip().splitlines()[-1]) / 1024}
        print(f"vocab {args.vocab}, hidden {args.hidden}, {args.added} added/replaced tokens per expert:")
        for name, r in results.items():
            print(f"  {name:34s} {r['seconds']:6.2f} s   peak RSS {r['max_rss_mb']:7.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
