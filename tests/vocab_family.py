"""A tiny Llama family whose experts have vocabularies of their own, built offline and deterministically.

* the base: a word-level tokenizer of 4 special and 28 ordinary tokens, a chat template, a LlamaForCausalLM
  (bfloat16, untied LM head) with 32 embedding rows;
* expert ``a``: the base's vocabulary plus the plain added tokens ``alpha`` and ``shared`` and the special token
  ``<|a|>`` (35 rows);
* expert ``b``: an ordinary vocabulary of its own: the base's words without ``w27``, plus ``b0`` and ``b1``, then
  the added token ``shared`` (33 rows), and another chat template.

Every weight is the base's plus seeded noise; the rows of the experts' own tokens are seeded too. Used by
``tests/test_mergekit_tokenizer.py`` and by ``tools/mergekit_vocab_fixture.py``, which runs mergekit 0.1.5 on the
same family to make the stored fixture the tests compare with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(28)]
BASE_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
B_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _tokenizer(words: list[str], template: str) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = template
    return tok


def tokenizers() -> dict[str, Any]:
    """The family's tokenizers: base, a, b."""
    base = _tokenizer(WORDS, BASE_TEMPLATE)
    a = _tokenizer(WORDS, BASE_TEMPLATE)
    a.add_tokens(["alpha", "shared"])
    a.add_special_tokens({"additional_special_tokens": ["<|a|>"]})
    b = _tokenizer([w for w in WORDS if w != "w27"] + ["b0", "b1"], B_TEMPLATE)
    b.add_tokens(["shared"])
    return {"base": base, "a": a, "b": b}


def build(root: Path, tied: bool = False) -> dict[str, Path]:
    """Write base, a and b under ``root``; their folders."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    toks = tokenizers()
    cfg = transformers.LlamaConfig(vocab_size=len(toks["base"]), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=tied, bos_token_id=2,
                                   eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    out: dict[str, Path] = {}
    for i, name in enumerate(("base", "a", "b")):
        tok = toks[name]
        c = transformers.LlamaConfig(**{**cfg.to_dict(), "vocab_size": len(tok)})
        model = transformers.LlamaForCausalLM(c).to(torch.bfloat16).eval()
        g = torch.Generator().manual_seed(100 + i)
        base_vocab = toks["base"].get_vocab()
        own = tok.get_vocab()
        sd = {}
        for k, w in model.state_dict().items():
            w0 = sd0[k]
            if w.shape == w0.shape and name == "base":
                sd[k] = w0
                continue
            noise = torch.randn(w.shape, generator=g) * 0.02
            if "embed_tokens" in k or "lm_head" in k:
                rows = torch.randn(w.shape, generator=g).to(torch.bfloat16)
                for t, j in own.items():  # the base's tokens keep the base's rows (+ noise), wherever they are
                    if t in base_vocab:
                        rows[j] = w0[base_vocab[t]] + noise[j].to(torch.bfloat16)
                sd[k] = rows
            else:
                sd[k] = (w0.float() + noise).to(torch.bfloat16)
        model.load_state_dict(sd, strict=False)
        if tied:
            model.tie_weights()
        folder = root / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    return out
