"""AdaMerging (Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024, arXiv
2310.02575): task-arithmetic coefficients learned by test-time adaptation on **unlabelled** inputs.

The merge is task arithmetic, theta(lambda) = theta_0 + sum_k lambda_k tau_k (task-wise: one lambda per expert),
or theta^g = theta_0^g + sum_k lambda_k^g tau_k^g (layer-wise: one lambda per expert and per decoder layer g of
the language model, plus one per expert, ``other``, for every merged tensor outside the decoder layers:
embeddings, final norm, lm_head, vision tower, projector), which is exactly what the engine's layer groups
(:class:`omnimerge.methods.base.Steps`, ``weight: {layers: [...], other: x}``) express. The paper's own code is
finer (one lambda per parameter tensor); a per-layer group is what an omnimerge recipe can carry, so that the
learned coefficients merge through the ordinary streaming engine.

Objective: the Shannon entropy H(p) = -sum_v p_v log p_v of the merged model's **next-token distribution at the
answer position(s)**, averaged over the rows of a batch, summed over the tasks (one batch per task per step).
The data are prompts only (the chat template's generation prompt at the end, left padding): the answer position
is the last prompt position, the distribution of the first answer token. With ``answer_tokens`` K > 1 the merged
model (at the current coefficients, without gradients) first decodes K-1 tokens greedily; the teacher-forced
forward on prompt + those tokens then gives the K distributions of answer tokens 1..K, whose mean entropy is the
per-row value (the appended tokens get attention mask 1 and token type 0, text; ``evaluation-search-data.md``
§3.4). Labels are never read: a batch's ``labels`` are ignored.

Optimisation as the paper: every coefficient starts at ``init`` (0.3), the forward pass uses
clamp(lambda, 0, 1) (a coefficient at a bound gets no gradient pushing it further), Adam (betas 0.9, 0.999) with
``lr`` (1e-3), a fixed number of ``steps``; each step takes the next batch of every task (the batch order of each
task reshuffled every pass over its batches by a generator seeded with ``seed``), sums the tasks' entropies and
takes one step. Same inputs and seed: same coefficients. The coefficients written are the clamped ones.

Modifiers in the recipe are kept: every one of them acts per expert on its task vector (``dare``,
``magnitude`` — TIES's trim —, ``breadcrumbs``) or linearly on the merged one (``lines``), so the task vectors the
optimiser sees are the modified ones and the written recipe, modifiers included, merges to the same model.
``magnitude`` gives AdaMerging on TIES-trimmed task vectors; AdaMerging++'s sign election is not expressible as a
modifier and is not implemented.

Memory: only the coefficients require grad. The base and every expert's task vector of each merged tensor are
held in memory in the recipe's compute dtype (they are obtained from the engine itself: the recipe merged in
memory once per expert with that expert's weight 1 and the others 0, once with all 0, so LoRA adapters work as
full experts do), and each step builds the merged tensors functionally (``torch.func.functional_call``) from
them: peak about (T + 3) x the merged tensors' size (base, T task vectors, one merged copy and its gradient)
plus the model and the activations of one step (T batches). That is a small-model design: for Qwen2-VL-7B
with 5 experts it is ~8 x 15 GB in bf16. At 7B the lean form of §3.4 is what fits: back-propagate to the merged
weights with an ordinary backward, form dL/dlambda_k^g = <dL/dtheta^g, tau_k^g> by streaming tau_k from pinned
host memory (or the memory-mapped checkpoints), rebuild theta after each Adam step: one model + its gradients
on the GPU and T task vectors in host RAM. It is not implemented here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnimerge.checkpoint.names import canonical_name
from omnimerge.errors import OmniMergeError, RecipeError
from omnimerge.plan import layer_of
from omnimerge.recipe import Recipe, validate_recipe

__all__ = ["AdaMergingResult", "FunctionalMerge", "adamerge", "adaptation_batches", "check_data", "check_recipe",
           "entropy_loss", "learned_recipe", "write_recipe"]

GRANULARITIES = ("task", "layer")


@dataclass
class AdaMergingResult:
    """Learned coefficients (clamped, shape (experts, groups)), the group names, the entropy (summed over the
    tasks' batches) of each step before its update, and the recipe that merges them (a dict with the YAML keys);
    ``info['entropy_first_batches']``: the entropy on the first batch of every task at the initial and at the
    learned coefficients."""

    coefficients: torch.Tensor
    granularity: str
    groups: list[str]
    entropy: list[float]
    recipe: dict[str, Any]
    seconds: float
    steps: int
    info: dict[str, Any] = field(default_factory=dict)


def _recipe_data(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(exclude={"base_dir"})


def check_recipe(recipe: Recipe) -> None:
    """One line if ``recipe`` is not a plain task-arithmetic merge of one full model."""
    if recipe.mode != "capability" or recipe.output != "full":
        raise RecipeError("adamerge: the recipe must merge one full model (mode: capability, output: full)")
    if recipe.merge_method != "task_arithmetic":
        raise RecipeError(f"adamerge: learns task-arithmetic coefficients; the recipe's merge_method is "
                          f"'{recipe.merge_method}' (use task_arithmetic: its scaling and weights are replaced by "
                          f"the learned coefficients)")
    if any(m.statistics for m in recipe.models):
        raise RecipeError("adamerge: task arithmetic takes no statistics files (models[].statistics)")


class FunctionalMerge:
    """The recipe's base and task vectors in memory, and theta(lambda) built from them with autograd.

    ``model`` is a model loaded from the recipe's base; its parameters are matched to the merged checkpoint
    tensors through their canonical names. ``granularity`` 'task' (one group) or 'layer' (one group per
    decoder layer of the language model, then ``other``)."""

    def __init__(self, recipe: Recipe, model: torch.nn.Module, granularity: str = "task",
                 merger_factory: Callable[[Any], Any] | None = None) -> None:
        from omnimerge.api import Merger
        from omnimerge.engine import MergeRun

        if granularity not in GRANULARITIES:
            raise OmniMergeError(f"--granularity: expected task or layer, got {granularity!r}")
        check_recipe(recipe)
        self.recipe = recipe
        self.granularity = granularity
        T = len(recipe.models)
        data = _recipe_data(recipe)
        data["parameters"] = {"scaling": 1.0}
        data["out_dtype"] = recipe.dtype  # the task vectors at the compute dtype
        for m in data["models"]:
            m["parameters"] = {**(m.get("parameters") or {}), "weight": 0.0}
        probe = validate_recipe(data, "adamerge", recipe.base_path)
        make = merger_factory or (lambda r: Merger(r, progress=False, hash_inputs=False))
        # the layer of every merged tensor, as the engine plans it (Steps apply to the decoder stack only)
        run = MergeRun(probe, None)
        try:
            run.open()
            jobs = [j for j in run.plan() if j.merged]
        finally:
            run.close()
        decoder = {w[0] for j in jobs if j.component == "language_model" and (w := layer_of(j.canonical))}
        self.num_layers = max((j.num_layers for j in jobs if (w := layer_of(j.canonical)) and w[0] in decoder),
                              default=0)
        if granularity == "layer" and self.num_layers == 0:
            raise RecipeError("adamerge: --granularity layer needs merged language-model decoder layers; the "
                              "recipe's select merges none")
        self.groups = (["all"] if granularity == "task"
                       else [f"layer {i}" for i in range(self.num_layers)] + ["other"])
        self.group_of: dict[str, int] = {}
        for j in jobs:
            w = layer_of(j.canonical)
            in_dec = w is not None and w[0] in decoder and j.layer is not None
            if granularity == "task":
                self.group_of[j.name] = 0
            else:
                self.group_of[j.name] = j.layer if in_dec else self.num_layers  # type: ignore[assignment]
        # base and task vectors, from the engine: weights all 0 -> theta_0; expert k alone at 1 -> theta_0 + tau_k
        with make(probe) as merger:
            zeros = [{"weight": 0.0} for _ in range(T)]
            self.base = merger.state_dict(None, zeros, device="cpu", only_merged=True)
            self.task_vectors: list[dict[str, torch.Tensor]] = []
            for k in range(T):
                one = [{"weight": 1.0 if i == k else 0.0} for i in range(T)]
                sd = merger.state_dict(None, one, device="cpu", only_merged=True)
                self.task_vectors.append({n: sd[n] - self.base[n] for n in self.base})
                del sd
        # checkpoint names -> the model's parameter names
        by_canonical = {canonical_name(n): n for n, _ in model.named_parameters()}
        by_canonical.update({canonical_name(n): n for n, _ in model.named_buffers()})
        self.param_of: dict[str, str] = {}
        for n in self.base:
            p = by_canonical.get(canonical_name(n))
            if p is None:
                raise OmniMergeError(f"adamerge: the merged tensor '{n}' is not a parameter of the loaded model")
            self.param_of[n] = p
        tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        self.dtypes = {n: tensors[p].dtype for n, p in self.param_of.items()}

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.task_vectors), len(self.groups)

    def tensor_bytes(self) -> int:
        """Bytes held: the base and every task vector of the merged tensors."""
        one = sum(t.numel() * t.element_size() for t in self.base.values())
        return one * (1 + len(self.task_vectors))

    def merged(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta(lam) for every merged tensor, under the model's parameter names (differentiable in ``lam``,
        shape (experts, groups); used as given, clamp before)."""
        out = {}
        for n, w0 in self.base.items():
            g = self.group_of[n]
            acc = w0
            for k, tv in enumerate(self.task_vectors):
                acc = acc + lam[k, g] * tv[n]
            out[self.param_of[n]] = acc.to(self.dtypes[n])
        return out

    def weights(self, lam: torch.Tensor) -> list[Any]:
        """Per expert, its recipe ``weight`` for coefficients ``lam`` (a float, or layer groups)."""
        lam = lam.detach().double()
        if self.granularity == "task":
            return [float(lam[k, 0]) for k in range(lam.shape[0])]
        return [{"layers": [float(x) for x in lam[k, :-1]], "other": float(lam[k, -1])} for k in range(lam.shape[0])]


def learned_recipe(recipe: Recipe, weights: Sequence[Any]) -> dict[str, Any]:
    """``recipe`` (task arithmetic) with ``scaling: 1`` and each expert's ``weight`` set; relative paths made
    absolute where they resolve from the recipe's folder (the written recipe may live elsewhere)."""
    data = _recipe_data(recipe)
    data["parameters"] = {**data.get("parameters", {}), "scaling": 1.0}
    root = recipe.base_path

    def absolute(p: str) -> str:
        q = Path(p)
        if not q.is_absolute() and root is not None and (root / q).exists():
            return str((root / q).resolve())
        return p

    data["base_model"] = absolute(data["base_model"])
    if data.get("copy_files_from"):
        data["copy_files_from"] = absolute(data["copy_files_from"])
    for m, w in zip(data["models"], weights, strict=True):
        m["model"] = absolute(m["model"])
        m["parameters"] = {**(m.get("parameters") or {}), "weight": w}
    validate_recipe(data, "adamerge")  # what is written is a valid recipe
    return data


def _answer_positions(mask: torch.Tensor) -> None:
    if mask is not None and not bool(mask[:, -1].all()):
        raise OmniMergeError("adamerge: the adaptation prompts must be left-padded (the last position of every "
                             "row is the answer position)")


def entropy_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], *,
                 answer_tokens: int = 1, banned: Sequence[int] = ()) -> torch.Tensor:
    """Mean over rows of the mean entropy of the next-token distributions of the first ``answer_tokens`` answer
    tokens (see the module docstring), the model run with ``params`` in place of its own tensors."""
    from torch.func import functional_call

    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    _answer_positions(mask)
    ins = dict(inputs)
    if answer_tokens > 1:  # greedy answer tokens 1..K-1, no gradient
        with torch.no_grad():
            detached = {k: v.detach() for k, v in params.items()}
            for _ in range(answer_tokens - 1):
                logits = functional_call(model, detached, args=(), kwargs={**ins, "use_cache": False}).logits
                nxt_logits = logits[:, -1, :].float()
                if banned:
                    nxt_logits[:, list(banned)] = -math.inf
                nxt = nxt_logits.argmax(-1, keepdim=True)
                width = ins["input_ids"].shape[1]
                for k, v in list(ins.items()):  # per-token inputs grow with the text token: mask 1, types 0
                    if k == "input_ids":
                        ins[k] = torch.cat([v, nxt], dim=1)
                    elif k == "attention_mask":
                        ins[k] = torch.cat([v, torch.ones_like(nxt)], dim=1)
                    elif not v.is_floating_point() and v.dim() == 2 and tuple(v.shape) == (len(v), width):
                        ins[k] = torch.cat([v, torch.zeros_like(nxt)], dim=1)
    out = functional_call(model, params, args=(), kwargs={**ins, "use_cache": False})
    logits = out.logits[:, ids.shape[1] - 1:, :]  # positions of answer tokens 1..K
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)  # (rows, K)
    return ent.mean()


def _cycle(n: int, gen: torch.Generator) -> Any:
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


def adamerge(recipe: Recipe, model: torch.nn.Module, data: Sequence[Sequence[Any]], *, steps: int = 100,
             lr: float = 1e-3, granularity: str = "task", init: float = 0.3, seed: int = 0, answer_tokens: int = 1,
             banned: Sequence[int] = (), device: str | torch.device = "cpu", progress: Any = None,
             functional: FunctionalMerge | None = None) -> AdaMergingResult:
    """Learn AdaMerging coefficients for ``recipe`` (task arithmetic) on ``data`` (per task, its batches:
    objects with an ``inputs`` dict of model inputs, prompts only; any ``labels`` are ignored) with ``model``
    loaded from the recipe's base (see the module docstring). The model is put in eval mode and its own
    parameters set not to require grad; its tensors are not changed (the merged ones are passed functionally)."""
    if steps < 0:
        raise OmniMergeError(f"--steps: must be at least 0, got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise OmniMergeError(f"--lr: must be a positive number, got {lr}")
    if answer_tokens < 1:
        raise OmniMergeError(f"--answer-tokens: must be at least 1, got {answer_tokens}")
    if not data or any(len(b) == 0 for b in data):
        raise OmniMergeError("adamerge: every task needs at least one batch of adaptation inputs")
    t0 = time.perf_counter()
    fm = functional or FunctionalMerge(recipe, model, granularity)
    device = torch.device(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for n in fm.base:
        fm.base[n] = fm.base[n].to(device)
    for tv in fm.task_vectors:
        for n in tv:
            tv[n] = tv[n].to(device)
    lam = torch.full(fm.shape, float(init), dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    orders = [_cycle(len(b), gen) for b in data]

    def batch_inputs(b: Any) -> dict[str, torch.Tensor]:
        mdtype = next(model.parameters()).dtype
        return {k: (v.to(device, mdtype) if v.is_floating_point() else v.to(device)) for k, v in b.inputs.items()}

    def loss_at(batches: list[Any]) -> torch.Tensor:
        params = fm.merged(lam.clamp(0.0, 1.0))
        return sum((entropy_loss(model, params, batch_inputs(b), answer_tokens=answer_tokens, banned=banned)
                    for b in batches), torch.zeros((), device=device))

    first = [b[0] for b in data]
    with torch.no_grad():  # the entropy on the first batch of each task, before and after
        before = float(loss_at(first))
    history: list[float] = []
    for _ in range(steps):
        batches = [b[next(o)] for b, o in zip(data, orders, strict=True)]
        opt.zero_grad(set_to_none=True)
        loss = loss_at(batches)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(float(loss.detach()))
    with torch.no_grad():
        after = float(loss_at(first))
    coef = lam.detach().clamp(0.0, 1.0).cpu()
    weights = fm.weights(coef)
    out = learned_recipe(recipe, weights)
    return AdaMergingResult(coef, fm.granularity, list(fm.groups), history, out, time.perf_counter() - t0, steps,
                            {"init": init, "lr": lr, "seed": seed, "answer_tokens": answer_tokens,
                             "tasks": len(data), "held_bytes": fm.tensor_bytes(),
                             "entropy_first_batches": [before, after]})


# ---------------------------------------------------------------------------------------------------------------
# the command: data checked first, then the model, then the optimisation, then the outputs


@dataclass
class DataSource:
    """One ``--data`` value: ``bench:TASK[,TASK]`` (the miniature suite; one task each) or a JSONL (one task)."""

    spec: str
    tasks: list[str]
    rows: list[dict[str, Any]] | None = None  # a JSONL's rows, read and checked

    @property
    def is_bench(self) -> bool:
        return self.spec.startswith("bench:")


def check_data(specs: Sequence[str], split: str, n: int, config: Any = None) -> list[DataSource]:
    """Every ``--data`` source read and checked (task names, split; a JSONL's rows, prompts and image files; with
    the base's ``config``, that a vision-language base gets images), before any model loads; one line on the
    first problem."""
    if not specs:
        raise OmniMergeError("--data: give at least one source (bench:TASK[,TASK] or a JSONL of prompts)")
    out = []
    for spec in specs:
        if spec.startswith("bench:"):
            from omnimerge.bench.calibration import check_prompt_source

            tasks = [t for t in spec[len("bench:"):].split(",") if t]
            check_prompt_source(tasks, split)
            out.append(DataSource(spec, tasks))
        else:
            from omnimerge.stats.data import read_rows

            rows = read_rows(Path(spec), n, "--data")
            if config is not None and getattr(config, "vision_config", None) is not None \
                    and not any(r["images"] for r in rows):
                raise OmniMergeError(f"--data {spec}: no row has an image, but the base is a vision-language model "
                                     f"({type(config).__name__}) whose vision tower and projector need image inputs")
            out.append(DataSource(spec, [Path(spec).stem], rows))
    return out


def adaptation_batches(sources: Sequence[DataSource], loaded: Any, *, split: str, n: int, batch_size: int,
                       seed: int) -> tuple[list[list[Any]], list[str], list[int]]:
    """Per task, its batches of prompts (no labels); the task names; the token ids greedy decoding must not emit
    (for ``answer_tokens`` > 1: the tokenizer's special tokens but end-of-sequence)."""
    data: list[list[Any]] = []
    names: list[str] = []
    banned: set[int] = set()
    for src in sources:
        if src.is_bench:
            from omnimerge.bench.calibration import bench_prompt_batches
            from omnimerge.bench.model import BOS, IMAGE, PAD, UNK

            data.extend(bench_prompt_batches(src.tasks, split, n, batch_size, seed))
            names.extend(src.tasks)
            banned.update((PAD, UNK, BOS, IMAGE))
        else:
            from omnimerge.stats.data import jsonl_batches

            data.append(list(jsonl_batches(Path(src.spec), loaded.processor, loaded.config, n=n,
                                           batch_size=batch_size, what=f"the base '{loaded.path}'",
                                           prompts_only=True, rows=src.rows, flag="--data")))
            names.extend(src.tasks)
            tok = getattr(loaded.processor, "tokenizer", loaded.processor)
            eos = getattr(tok, "eos_token_id", None)
            banned.update(i for i in getattr(tok, "all_special_ids", []) if i != eos)
    return data, names, sorted(banned)


def write_recipe(result: AdaMergingResult, path: Path, header: str) -> Path:
    """The learned recipe as YAML at ``path``, atomically (its folder made if missing)."""
    from omnimerge.checkpoint.files import atomic_write

    text = validate_recipe(result.recipe, str(path)).to_yaml()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_bytes((header + text).encode()))
    return path


def header_of(result: AdaMergingResult, data: Sequence[str], split: str) -> str:
    before, after = result.info["entropy_first_batches"]
    return (f"# omnimerge adamerge: {result.granularity}-wise AdaMerging coefficients (entropy minimisation on "
            f"unlabelled inputs: {', '.join(data)}, split {split}), {result.steps} Adam steps, lr "
            f"{result.info['lr']:g}, init {result.info['init']:g}, seed {result.info['seed']}, answer tokens "
            f"{result.info['answer_tokens']}\n# entropy on the first batch of each task (summed): {before:.4f} -> "
            f"{after:.4f}; run it with: omnimerge merge THIS.yaml -o merged\n")
