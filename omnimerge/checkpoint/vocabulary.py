"""The output vocabulary of a merge (mergekit's ``tokenizer_source`` / ``tokenizer:``) and its chat template.

Planned before the merge from the tokenizers alone (:func:`plan_vocabulary`):

* the output tokenizer: the base's (``source: base``), another model's (``source: MODEL``), or the union of every
  input's vocabulary (``source: union``): the base's tokenizer, then each other input's ordinary tokens it lacks,
  then every input's added tokens (special or not, with their settings) it lacks, inputs in the recipe's order;
  then the ``tokens:`` keys it lacks; the row count rounded up to ``pad_to_multiple_of``;
* per input (the base first, then the experts), where each output token's row is in that input (or nowhere);
* per output token that some input lacks (or whose ``tokens:`` entry says ``force``), its default row, the same
  for every input: the ``tokens:`` entry's source (a model's own row of that token, a named token or id of a
  model, or zeros), else the only input that has it, else the base's row, else the average of the inputs that
  have it; a token no input has gets zeros. Padding rows are the mean of that input's other rows.

The re-indexing is then a per-input transform of the vocabulary tensors (token embeddings, LM head; a tied head
has no tensor of its own), installed with :meth:`~omnimerge.checkpoint.reader.Checkpoint.replace`: every merge
strategy reads re-indexed inputs, one tensor at a time, and the method merges them as any other tensor.

Tokenizers are read with ``transformers`` (``trust_remote_code=False``, local files only) after every tokenizer
file of the folder passed the reader's checks (regular files inside the checkpoint: no FIFO, no link outside).
Chat templates are data: written into the output's tokenizer files by ``transformers``, never rendered here.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from omnimerge.checkpoint.reader import Checkpoint, regular_file, resolve_model_path
from omnimerge.errors import CheckpointError, OutputError, RecipeError, quoted

# --- the recipe's settings ----------------------------------------------------------------------------------------


class ModelToken(BaseModel):
    """A token's row taken from a model's own row of another token (``token``) or id (``token_id``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> ModelToken:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token and token_id")
        return self


class ZeroToken(BaseModel):
    """A token's row of zeros."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSetting(BaseModel):
    """Where one output token's default row comes from; ``force``: every input takes it, even one that has the
    token."""

    model_config = ConfigDict(extra="forbid")
    source: str | ModelToken | ZeroToken | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """The recipe's ``tokenizer:``: which vocabulary the output has (``base``, ``union`` or a model's path)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSetting] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


# --- chat templates -----------------------------------------------------------------------------------------------

#: omnimerge's own Jinja text of the conversation formats mergekit knows by name
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}{%- for m in messages -%}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    "alpaca": (
        "{%- set sys = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{%- if sys -%}{{ sys[-1]['content'] | trim + '\\n\\n' }}{%- endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] | trim }}"
        "{%- elif m['role'] == 'user_context' -%}{{ '### Input:\\n' + m['content'] | trim }}"
        "{%- elif m['role'] == 'assistant' -%}{{ '### Response:\\n' + m['content'] | trim }}{%- endif -%}"
        "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '\\n\\n### Response:\\n' }}"
        "{%- endif -%}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}{%- for m in turns -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('roles must alternate user/assistant after an optional system message') -}}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}{%- if loop.first and system is defined -%}"
        "{{ ' [INST] ' + system + '\\n\\n' + m['content'] + ' [/INST]' }}"
        "{%- else -%}{{ ' [INST] ' + m['content'] + ' [/INST]' }}{%- endif -%}"
        "{%- else -%}{{ ' ' + m['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
    ),
    "exaone": (
        "{%- for m in messages -%}{%- if loop.first and m['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}"
        "{%- endif -%}{{ '[|' + m['role'] + '|]' + m['content'] }}"
        "{%- if m['role'] == 'user' -%}{{ '\\n' }}{%- else -%}{{ '[|endofturn|]\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
    ),
}

#: files that make up a tokenizer (and its chat template) in a checkpoint folder
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")

#: the names of vocabulary tensors (rows indexed by token id); a tensor is one when its first axis also has the
#: model's vocabulary size
_VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|lm_head|embed_out"
                           r"|output_layer)\.(weight|bias)$")


def _checked_folder(folder: Path) -> None:
    """Every tokenizer file of ``folder`` is a regular file inside it (the reader's rules), before transformers
    opens any of them."""
    for name in TOKENIZER_FILES:
        p = folder / name
        if p.exists() or p.is_symlink():
            regular_file(p, folder)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                                               "tokenizer_config.json"))


def load_tokenizer(folder: Path, who: str) -> Any:
    """The tokenizer of a checkpoint folder (fast, local files, no remote code); None if it has none."""
    if not _has_tokenizer(folder):
        return None
    _checked_folder(folder)
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                                          local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken tokenizer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{who} ({folder}): cannot load its tokenizer with transformers "
                              f"(trust_remote_code=False): {first[:200]}") from None


def config_vocab_size(config: dict[str, Any]) -> int | None:
    """The vocabulary size a config declares (``vocab_size``, or its ``text_config``'s)."""
    for cfg in (config, config.get("text_config") or {}):
        v = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_chat_template(value: str) -> str:
    """A recipe's ``chat_template``, checked before any work: auto, a format name, or a Jinja template (at least
    20 characters with a ``{``: mergekit's rule)."""
    if value != "auto" and value not in CHAT_TEMPLATES and (len(value) < 20 or "{" not in value):
        raise ValueError(f"{quoted(value, 60)} is neither auto, a template name ({', '.join(sorted(CHAT_TEMPLATES))})"
                         f" nor a Jinja template")
    return value


#: the recipe's ``chat_template`` type
ChatTemplate = Annotated[str, AfterValidator(check_chat_template)]


def resolve_chat_template(value: str, tokenizers: list[tuple[str, Any]]) -> str | None:
    """The template text of a recipe's ``chat_template``: ``auto`` (the template most inputs carry, the first
    seen on a tie; None when none has one), a name of :data:`CHAT_TEMPLATES`, or a literal Jinja template."""
    if value == "auto":
        seen = []
        for _who, tok in tokenizers:
            t = getattr(tok, "chat_template", None) if tok is not None else None
            if isinstance(t, dict):
                t = t.get("default")
            if isinstance(t, str) and t.strip():
                seen.append(t.strip())
        return Counter(seen).most_common(1)[0][0] if seen else None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    try:
        return check_chat_template(value)
    except ValueError as e:
        raise RecipeError(f"chat_template: {e}") from None


# --- the plan -----------------------------------------------------------------------------------------------------


@dataclass
class VocabularyPlan:
    """The output vocabulary and, per input, how its vocabulary tensors are re-indexed into it."""

    tokenizer: Any
    source: str
    #: output rows: the vocabulary, padded to ``pad_to_multiple_of``
    size: int
    n_tokens: int
    #: per input (base first), the input row of each output token (-1: the input lacks it)
    rows: list[torch.Tensor]
    #: output token ids whose default row is used by some input, and their sources [(input, row), ...] (averaged;
    #: empty: zeros)
    default_ids: torch.Tensor
    default_sources: list[list[tuple[int, int]]]
    #: output token ids every input takes the default row for (``force``)
    forced: torch.Tensor
    notes: list[str] = field(default_factory=list)
    #: the merge's compute dtype: re-indexed tensors are made in it where it is wider than the stored one
    dtype: torch.dtype = torch.float32
    #: per input, its vocabulary size (config.json's; token ids at or past it are not its rows)
    input_sizes: list[int] = field(default_factory=list)
    #: per input, the names of the tensors replaced
    replaced: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        #: per input k, (positions among default_ids, rows of k) that it contributes to the default rows
        self._by_input: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        grouped: dict[int, tuple[list[int], list[int]]] = {}
        for j, srcs in enumerate(self.default_sources):
            for k, r in srcs:
                grouped.setdefault(k, ([], []))
                grouped[k][0].append(j)
                grouped[k][1].append(r)
        for k, (pos, rows) in grouped.items():
            self._by_input[k] = (torch.tensor(pos, dtype=torch.long), torch.tensor(rows, dtype=torch.long))
        self._counts = torch.tensor([max(1, len(s)) for s in self.default_sources], dtype=torch.float32)

    def account(self, jobs: list[Any], n_inputs: int) -> None:
        """Add to each re-indexed job's working memory the inputs' re-indexed copies (whole tensors)."""
        names = set(self.replaced[0]) if self.replaced else set()
        for j in jobs:
            if j.name in names:
                es = torch.promote_types(j.meta.dtype, self.dtype).itemsize
                row = j.meta.numel // max(1, self.size)
                j.cost += n_inputs * j.meta.numel * es + len(self.default_ids) * row * 8

    def reindex(self, i: int, stored: list[torch.Tensor | None]) -> torch.Tensor:
        """Input ``i``'s vocabulary tensor in the output vocabulary, from every input's stored tensor of that name
        (None where an input lacks it): its own rows, the default rows, then the padding rows; in the stored dtype,
        or the merge's compute dtype where that is wider (averaged rows are not rounded twice)."""
        own = stored[i]
        assert own is not None
        dtype = torch.promote_types(own.dtype, self.dtype)
        out = torch.zeros((self.size, *own.shape[1:]), dtype=dtype)
        if len(self.default_ids):
            acc = torch.zeros((len(self.default_ids), *own.shape[1:]), dtype=torch.float32)
            for k, (pos, rows) in self._by_input.items():
                src = stored[k]
                if src is None:
                    raise CheckpointError(f"input {k}: lacks a vocabulary tensor the default rows are taken from")
                acc.index_add_(0, pos, src[rows].to(torch.float32))
            acc /= self._counts.reshape(-1, *([1] * (acc.ndim - 1)))
            out[self.default_ids] = acc.to(dtype)
        p = self.rows[i]
        keep = p >= 0
        keep[self.forced] = False
        ids = torch.nonzero(keep).reshape(-1)
        out[ids] = own[p[ids]].to(dtype)
        if self.size > self.n_tokens:
            out[self.n_tokens:] = out[: self.n_tokens].to(torch.float32).mean(0).to(dtype)
        return out

    def lines(self) -> list[str]:
        """What the output carries, for the model card."""
        return [f"tokenizer: {self.source} ({self.n_tokens} tokens, {self.size} embedding rows)"]


def _vocab(tok: Any, size: int) -> dict[str, int]:
    """A tokenizer's token -> id, without ids at or past the model's vocabulary size (mergekit's rule)."""
    return {t: i for t, i in tok.get_vocab().items() if i < size}


def _union(base_tok: Any, inputs: list[tuple[Any, int]]) -> Any:
    """The base's tokenizer extended with every other input's ordinary tokens, then every input's added tokens,
    that it lacks (inputs in order, each input's tokens by id; an added token's first settings win)."""
    import copy

    out = copy.deepcopy(base_tok)
    have = set(out.get_vocab())
    added: dict[str, Any] = {}
    plain: dict[str, None] = {}  # ordered
    for tok, size in inputs:
        decoder = {i: a for i, a in tok.added_tokens_decoder.items() if i < size}
        added_names = {a.content for a in decoder.values()}
        for t, _i in sorted(_vocab(tok, size).items(), key=lambda kv: kv[1]):
            if t not in added_names and t not in have:
                plain.setdefault(t)
        for _i, a in sorted(decoder.items()):
            added.setdefault(a.content, a)
    plain_set = plain.keys()
    new_plain = [t for t in plain if t not in added]  # one call each: the library numbers them in order
    if new_plain:
        out.add_tokens(new_plain)
    new_added = [a for content, a in added.items() if content not in have or content in plain_set]
    if new_added:
        out.add_tokens(new_added)
    return out


def plan_vocabulary(settings: TokenizerSettings, base: Checkpoint, experts: list[Checkpoint],
                    base_dir: Path | None, names: tuple[str, list[str]]) -> VocabularyPlan:
    """The output vocabulary and the re-indexing of every input (``base``, then ``experts``, named in errors by
    ``names``: the base's recipe reference and the experts')."""
    ckpts = [base, *experts]
    who = [f"base '{names[0]}'"] + [f"model '{n}'" for n in names[1]]
    notes: list[str] = []
    sizes: list[int] = []
    toks: list[Any] = []
    for ck, w in zip(ckpts, who, strict=True):
        tok = load_tokenizer(ck.path, w)
        size = config_vocab_size(ck.config) or (len(tok.get_vocab()) if tok is not None else None)
        if size is None:
            raise CheckpointError(f"{w} ({ck.path}): neither a vocab_size in config.json nor a tokenizer")
        sizes.append(size)
        toks.append(tok)
    if toks[0] is None:
        raise CheckpointError(f"{who[0]} ({base.path}): has no tokenizer; tokenizer_source needs the base's")
    for i, tok in enumerate(toks):
        if tok is None:
            notes.append(f"tokenizer: {who[i]} has no tokenizer; taken to have the base's vocabulary")
            toks[i] = toks[0]
    past = sum(1 for i in toks[0].get_vocab().values() if i >= sizes[0])
    if past and settings.source in ("base", "union"):
        notes.append(f"tokenizer: the base's tokenizer has {past} token(s) at or past its vocab_size {sizes[0]}; "
                     f"mergekit drops them from a BPE tokenizer, omnimerge keeps them (rows of zeros)")
    src = settings.source
    if src == "base":
        out_tok = toks[0]
    elif src == "union":
        out_tok = _union(toks[0], list(zip(toks, sizes, strict=True)))
    else:
        try:
            folder = resolve_model_path(src, base_dir)
        except CheckpointError as e:
            raise RecipeError(f"tokenizer.source: {e}") from None
        out_tok = load_tokenizer(folder, f"tokenizer source '{src}'")
        if out_tok is None:
            raise CheckpointError(f"tokenizer source '{src}' ({folder}): has no tokenizer")
    if settings.tokens:
        import copy

        out_tok = copy.deepcopy(out_tok) if out_tok is toks[0] else out_tok
        have = set(out_tok.get_vocab())
        new = [t for t in settings.tokens if t not in have]
        if new:
            out_tok.add_tokens(new)
    vocab = out_tok.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise CheckpointError(f"tokenizer ({src}): its token ids are not 0..{n - 1}; cannot index embeddings by it")
    size = n
    pad = settings.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    inv = [""] * n
    for t, i in vocab.items():
        inv[i] = t
    in_vocabs = [_vocab(tok, s) for tok, s in zip(toks, sizes, strict=True)]
    rows = [torch.tensor([v.get(t, -1) for t in inv], dtype=torch.long) for v in in_vocabs]
    index = {}
    for i, w in enumerate(names[1]):
        index.setdefault(w, i + 1)
    index.setdefault(names[0], 0)

    def input_of(ref: str, where: str) -> int:
        if ref not in index:
            raise RecipeError(f"tokenizer.tokens.{where}: '{ref}' is not one of the recipe's models "
                              f"({', '.join(sorted(index))})")
        return index[ref]

    default_ids: list[int] = []
    default_sources: list[list[tuple[int, int]]] = []
    forced: list[int] = []
    rowl = [r.tolist() for r in rows]
    nowhere: list[str] = []
    for t, tid in vocab.items():
        present = [k for k in range(len(ckpts)) if rowl[k][tid] >= 0]
        cfg = settings.tokens.get(t)
        if cfg is not None and cfg.force:
            forced.append(tid)
        if len(present) == len(ckpts) and not (cfg is not None and cfg.force):
            continue
        srcs: list[tuple[int, int]]
        if cfg is not None and cfg.source is not None:
            s = cfg.source
            if isinstance(s, ZeroToken):
                srcs = []
            elif isinstance(s, ModelToken):
                k = input_of(s.model, f"{t}.source.model")
                r = s.token_id if s.token_id is not None else in_vocabs[k].get(str(s.token), -1)
                if r < 0 or r >= sizes[k]:
                    raise RecipeError(f"tokenizer.tokens.{t}.source: model '{s.model}' has no token "
                                      f"{quoted(str(s.token if s.token_id is None else s.token_id), 40)}")
                srcs = [(k, r)]
            else:
                k = input_of(s, f"{t}.source")
                if rowl[k][tid] < 0:
                    raise RecipeError(f"tokenizer.tokens.{t}.source: model '{s}' has no token {quoted(t, 40)}")
                srcs = [(k, rowl[k][tid])]
        elif cfg is not None:
            raise RecipeError(f"tokenizer.tokens.{t}: a source is needed (a model, model_token or zero)")
        elif len(present) == 1:
            srcs = [(present[0], rowl[present[0]][tid])]
        elif not present:
            srcs = []
            nowhere.append(t)
        elif 0 in present:
            srcs = [(0, rowl[0][tid])]
        else:
            srcs = [(k, rowl[k][tid]) for k in present]
        default_ids.append(tid)
        default_sources.append(srcs)
    if nowhere:
        notes.append(f"tokenizer: {len(nowhere)} token(s) of the output vocabulary are in no input's, e.g. "
                     f"{quoted(nowhere[0], 40)}; their rows are zeros")
    return VocabularyPlan(out_tok, src, size, n, rows, torch.tensor(default_ids, dtype=torch.long),
                          default_sources, torch.tensor(forced, dtype=torch.long), notes, input_sizes=sizes)


def plan_and_install(settings: TokenizerSettings, base: Checkpoint, experts: list[Checkpoint | None],
                     base_dir: Path | None, names: tuple[str, list[str]],
                     dtype: torch.dtype = torch.float32) -> tuple[VocabularyPlan | None, list[str]]:
    """:func:`plan_vocabulary` then :func:`install`, for experts that are full checkpoints (None: an adapter); the
    plan and its notes. ``source: base`` (alone) over inputs that have no tokenizer and one vocabulary size
    re-indexes nothing: no plan."""
    full: list[Checkpoint] = []
    for n, ck in zip(names[1], experts, strict=True):
        if ck is None:
            raise RecipeError(f"tokenizer: model '{n}' is a PEFT adapter; re-indexing the vocabulary needs full "
                              f"checkpoints (merge the adapter into its base first)")
        full.append(ck)
    ckpts = [base, *full]
    if (settings.source == "base" and not settings.tokens and not settings.pad_to_multiple_of
            and not any(_has_tokenizer(ck.path) for ck in ckpts)
            and len({config_vocab_size(ck.config) for ck in ckpts}) == 1):
        return None, ["tokenizer_source: base: no input has a tokenizer; the vocabulary tensors are merged as they "
                      "are (one vocabulary size) and no tokenizer is written"]
    plan = plan_vocabulary(settings, base, full, base_dir, names)
    plan.dtype = dtype
    install(plan, base, full)
    return plan, plan.notes


def write_output_files(folder: Path, plan: VocabularyPlan | None, chat_template: str | None,
                       inputs: list[tuple[str, Path]], note: Any) -> list[str]:
    """After the base's files were copied into the output ``folder``: the planned tokenizer and ``vocab_size``,
    and the recipe's chat template; what the output carries (for the model card), empty if the recipe chose
    neither."""
    if plan is None and chat_template is None:
        return []
    carries = plan.lines() if plan is not None else []
    tok = plan.tokenizer if plan is not None else load_tokenizer(folder, "the output")
    template = None
    if chat_template is not None:
        if tok is None:
            note("chat_template: the output has no tokenizer; the chat template is not written")
        else:
            template = resolve_chat_template(chat_template, [(w, load_tokenizer(p, w)) for w, p in inputs])
            if template is None:
                note("chat_template: auto: no input has a chat template; the output keeps its own")
            kind = ("a Jinja template" if chat_template not in CHAT_TEMPLATES and chat_template != "auto"
                    else chat_template)
            carries.append(f"chat template: {kind}" + ("" if template is None else
                                                        f" ({len(template)} characters)"))
    if plan is not None:
        set_config_vocab_size(folder, plan.size)
    if tok is not None and (plan is not None or template is not None):
        write_tokenizer(folder, tok, template)
    return carries


def install(plan: VocabularyPlan, base: Checkpoint, experts: list[Checkpoint]) -> list[str]:
    """Replace every input's vocabulary tensors by their re-indexed form (see :meth:`VocabularyPlan.reindex`);
    the base's on-disk names of the replaced tensors."""
    ckpts = [base, *experts]
    size0 = plan.input_sizes[0]
    canon = [base.canonical_of(n) for n, m in base.tensors.items()
             if _VOCAB_TENSOR.search(base.canonical_of(n)) and m.shape and m.shape[0] == size0]
    if not canon:
        raise CheckpointError(f"{base.path}: no token embedding or LM head with {size0} rows (the vocabulary size) "
                              f"to re-index into the output vocabulary")
    plan.replaced = [[] for _ in ckpts]
    done = []
    for c in canon:
        on_disk = [ck.find(c) for ck in ckpts]
        shapes = [tuple(ck.read_stored(n).shape) if n is not None else None
                  for ck, n in zip(ckpts, on_disk, strict=True)]
        tail = shapes[0][1:]  # type: ignore[index]
        for ck, s, want in zip(ckpts, shapes, plan.input_sizes, strict=True):
            if s is not None and s[1:] != tail:
                raise CheckpointError(f"{ck.path}: tensor '{c}' has shape {list(s)}; the base's has {list(shapes[0])}"
                                      f" (only the vocabulary axis may differ)")
            if s is not None and s[0] < want:
                raise CheckpointError(f"{ck.path}: tensor '{c}' has {s[0]} rows, fewer than the {want} tokens of "
                                      f"its vocabulary")

        def produce(i: int, c: str = c, on_disk: list[str | None] = on_disk) -> torch.Tensor:
            stored = [ck.read_stored(n) if n is not None else None for ck, n in zip(ckpts, on_disk, strict=True)]
            return plan.reindex(i, stored)

        for i, (ck, n) in enumerate(zip(ckpts, on_disk, strict=True)):
            if n is not None:
                ck.replace(n, (plan.size, *tail), lambda i=i, produce=produce: produce(i))
                plan.replaced[i].append(n)
        done.append(on_disk[0])
    return [d for d in done if d is not None]


def write_tokenizer(folder: Path, tokenizer: Any, chat_template: str | None) -> None:
    """The output's tokenizer files (those copied from the base are replaced), with ``chat_template`` set."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(folder))
    except OSError as e:
        raise OutputError(f"{folder}: cannot write the tokenizer ({e.strerror or e})") from None


def set_config_vocab_size(folder: Path, size: int) -> None:
    """The output's ``config.json`` declares ``size`` tokens (top level and ``text_config``, where present)."""
    import json

    p = folder / "config.json"
    if not p.is_file():
        return
    cfg = json.loads(p.read_text(encoding="utf-8"))
    if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict):
        cfg["vocab_size"] = size
    if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
        cfg["text_config"]["vocab_size"] = size
    p.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
