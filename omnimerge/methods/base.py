"""The merge-method API: declared hyper-parameters, the per-tensor context, the registry.

A merge method is a pure function over the tensors of **one** parameter::

    def fn(base: Tensor, task_vectors: Sequence[Tensor], ctx: TensorContext, **params) -> Tensor

``base`` is the base weight W0 and ``task_vectors`` the experts' task vectors tau_i = W_i - W0, all in the compute
dtype on the compute device. It returns the merged **delta** (already multiplied by the method's scaling lambda,
if it has one): the engine writes ``W = W0 + delta``. Methods know nothing of files, names on disk or dtypes
of the output. The task vectors are the method's own (fresh tensors the engine does not use again): it may
work in them in place; ``base`` is read-only.

A method is declared with :func:`merge_method`, which records its hyper-parameters (:class:`Param`), its paper,
its summary and its :class:`Capabilities`: what else the engine may do with it and get the same result (merge it
block by block, run a compiled kernel, use a streamed implementation, compute it from the experts' weights
alone). The engine chooses how to run a method from these declarations only. Adding a method takes one file and
one line in :mod:`omnimerge.methods` (the import that runs the decorator). Methods never write into the
:class:`TensorContext` they are given.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from omnimerge.errors import MethodParameterError, quoted
from omnimerge.types import LowRank

__all__ = ["Capabilities", "Filters", "GlobalPass", "LowRank", "MergeMethod", "Param", "Schedule", "Statistics",
           "Steps", "TaskMasks", "TensorContext", "at_depth", "merge_method", "registry"]

ParamValue = float | int | str | bool | None


@dataclass(frozen=True)
class Schedule:
    """A float parameter over depth (mergekit's *gradient*): ``values`` at evenly spaced points from the first
    layer (t = 0) to the last (t = 1), linearly interpolated at t = layer / (num_layers - 1). Tensors outside
    the layer stack (embeddings, final norm, lm_head) take t = 0, as in mergekit. Written as a list in a recipe:
    ``density: [0.2, 0.5, 0.8]``."""

    values: tuple[float, ...]

    def at(self, t: float) -> float:
        """The value at ``t`` (clamped to [0, 1]): x = t (n - 1), i = floor(x), f = x - i,
        (1 - f) v_i + f v_{i+1} — mergekit's arithmetic, so a gradient gives mergekit's value to the bit."""
        n = len(self.values)
        if n == 1:
            return self.values[0]
        x = min(max(t, 0.0), 1.0) * (n - 1)
        i = int(x)
        f = x - i
        return (1 - f) * self.values[i] + f * self.values[min(i + 1, n - 1)]

    def to_list(self) -> list[float]:
        return list(self.values)


@dataclass(frozen=True)
class Steps:
    """A float parameter piecewise constant over the language model's decoder layers (layer groups): with k
    ``layers`` values and a decoder stack of L layers, layer l takes ``layers[l * k // L]`` (k contiguous
    blocks, integer arithmetic: every layer gets its group's value exactly); every other tensor (embeddings, final
    norm, lm_head, the vision tower's layers, the projector) takes ``other``. Written in a recipe as a mapping:
    ``weight: {layers: [0.2, 0.5, 0.8, 1.0], other: 0.6}``."""

    layers: tuple[float, ...]
    other: float

    def at(self, layer: int | None, num_layers: int) -> float:
        """The value of a tensor at ``layer`` of a decoder stack of ``num_layers`` (``layer`` None: not in it)."""
        if layer is None or num_layers <= 0:
            return self.other
        return self.layers[min(layer * len(self.layers) // num_layers, len(self.layers) - 1)]

    def group(self, layer: int | None, num_layers: int) -> int | None:
        """The group index of that tensor (None: ``other``)."""
        if layer is None or num_layers <= 0:
            return None
        return min(layer * len(self.layers) // num_layers, len(self.layers) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "other": self.other}


@dataclass(frozen=True)
class Filters:
    """A float parameter chosen by tensor name (mergekit's filtered lists): ``entries`` are (filter, value,
    component) triples tried in order, and the first that matches gives the value: its filter a substring of the
    tensor's name (in the base checkpoint; None matches every name) and its component, if not None, the tensor's
    component (``omnimerge.components``: how mergekit's per-module parameters are written). A value is a number
    or a :class:`Schedule` (then taken at the tensor's depth t, as any schedule). No entry matching: ``other``
    (None: no value; refused when planned where the parameter needs one). Written in a recipe as a mapping:
    ``weight: {filters: [{filter: self_attn, value: [0, 1]}, {component: vision_tower, value: 0.5}],
    other: 1.0}`` (``other`` defaults to the parameter's default)."""

    entries: tuple[tuple[str | None, float | Schedule, str | None], ...]
    other: float | Schedule | None = None

    def pick(self, name: str, component: str = "") -> float | Schedule | None:
        """The entry's value (or ``other``) for tensor ``name``, before any schedule is taken at a depth."""
        for flt, value, comp in self.entries:
            if (flt is None or (name and flt in name)) and (comp is None or comp == component):
                return value
        return self.other

    def at(self, name: str, t: float, component: str = "") -> float | None:
        v = self.pick(name, component)
        return v.at(t) if isinstance(v, Schedule) else v

    def to_dict(self) -> dict[str, Any]:
        def one(v: float | Schedule | None) -> Any:
            return v.to_list() if isinstance(v, Schedule) else v

        entries = []
        for f, v, c in self.entries:
            entries.append({"filter": f, "value": one(v)} if c is None else
                           {**({"filter": f} if f is not None else {}), "component": c, "value": one(v)})
        out: dict[str, Any] = {"filters": entries}
        if self.other is not None:
            out["other"] = one(self.other)
        return out


def at_depth(kwargs: Mapping[str, Any], t: float, layer: int | None = None, num_layers: int = 0,
             decoder: bool = False, name: str = "", component: str = "") -> dict[str, Any]:
    """``kwargs`` with every :class:`Schedule` (also inside per-model tuples) replaced by its value at ``t``,
    every :class:`Steps` by its value at ``layer`` of a ``num_layers`` decoder stack (``decoder`` False: the
    tensor is not in the language model's decoder layers), and every :class:`Filters` by its value for the
    tensor ``name`` (of ``component``) at ``t``."""
    def one(v: Any) -> Any:
        if isinstance(v, Schedule):
            return v.at(t)
        if isinstance(v, Filters):
            return v.at(name, t, component)
        if isinstance(v, Steps):
            return v.at(layer, num_layers) if decoder else v.other
        if isinstance(v, tuple):
            return tuple(one(x) for x in v)
        return v

    return {k: one(v) for k, v in kwargs.items()}


def has_schedule(kwargs: Mapping[str, Any]) -> bool:
    return any(isinstance(v, Schedule | Steps | Filters)
               or (isinstance(v, tuple) and any(isinstance(x, Schedule | Steps | Filters) for x in v))
               for v in kwargs.values())


def plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with schedules written as lists (for reports and model cards)."""
    def one(v: Any) -> Any:
        if isinstance(v, Schedule):
            return v.to_list()
        if isinstance(v, Steps | Filters):
            return v.to_dict()
        if isinstance(v, tuple):
            return [one(x) for x in v]
        return v

    return {k: one(v) for k, v in kwargs.items()}


@dataclass(frozen=True)
class Param:
    """One declared hyper-parameter of a merge method.

    ``low``/``high`` bound numeric values (``low_open``/``high_open`` make the bound strict); ``choices``
    restricts strings. ``per_model`` parameters may also be given per expert under ``models[].parameters``;
    the method then receives a tuple with one value per expert.
    """

    name: str
    default: ParamValue
    doc: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    per_model: bool = False
    nullable: bool = False

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return f"a {self.kind.__name__}"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        lb = "(" if (self.low is None or self.low_open) else "["
        hb = ")" if (self.high is None or self.high_open) else "]"
        return f"a {self.kind.__name__} in {lb}{lo}, {hi}{hb}"

    def validate(self, value: Any, where: str) -> ParamValue | Schedule | Steps | Filters:
        """Coerce ``value`` to the declared type and check its range; ``where`` names it in errors. A list is a
        :class:`Schedule` over depth, a mapping ``{layers: [...], other: x}`` a :class:`Steps` over the decoder's
        layer groups, ``{filters: [...], other: x}`` a :class:`Filters` by tensor name (float parameters only),
        each value checked."""
        if isinstance(value, dict):
            if self.kind is not float or self.choices is not None:
                raise MethodParameterError(
                    f"{where}: '{self.name}' must be {self.describe_range()}, got a mapping (layer groups "
                    f"{{layers: [...], other: x}} and filters {{filters: [...], other: x}} are for float "
                    f"parameters only)")
            if "filters" in value:
                return self._filters(value, where)
            if set(value) != {"layers", "other"} or not isinstance(value["layers"], list | tuple) \
                    or not value["layers"]:
                raise MethodParameterError(
                    f"{where}: '{self.name}': layer groups are written {{layers: [v1, v2, ...], other: v}}, got "
                    f"{quoted(value, 60)}")
            vals = tuple(float(self.validate(v, where)) for v in value["layers"])  # type: ignore[arg-type]
            return Steps(vals, float(self.validate(value["other"], where)))  # type: ignore[arg-type]
        if isinstance(value, list | tuple):
            if value and all(isinstance(x, dict) for x in value) and self.kind is float:
                raise MethodParameterError(
                    f"{where}: '{self.name}': a list of mappings; per-tensor values are written "
                    f"{{filters: [{{filter: name-part, value: v}}, ...], other: v}}")
            if self.kind is not float or self.choices is not None:
                raise MethodParameterError(
                    f"{where}: '{self.name}' must be {self.describe_range()}, got the list {list(value)!r} "
                    f"(a list is a schedule over depth, for float parameters only)")
            if not value:
                raise MethodParameterError(f"{where}: '{self.name}': an empty list (a schedule needs values)")
            vals = tuple(float(self.validate(v, where)) for v in value)  # type: ignore[arg-type]
            return vals[0] if len(vals) == 1 else Schedule(vals)
        if value is None:
            if self.nullable:
                return None
            raise MethodParameterError(f"{where}: '{self.name}' must be {self.describe_range()}, got null")
        try:
            if self.kind is bool:
                if isinstance(value, bool):
                    v: Any = value
                elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                    v = value.lower() in ("true", "yes", "1")
                else:
                    raise ValueError
            elif self.kind is int:
                if isinstance(value, bool):
                    raise ValueError
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                v = int(value)
                if not -(2**63) <= v < 2**63:
                    raise ValueError
            elif self.kind is float:
                if isinstance(value, bool):
                    raise ValueError
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError
            else:
                v = str(value)
        except (TypeError, ValueError, OverflowError):
            raise MethodParameterError(
                f"{where}: '{self.name}' must be {self.describe_range()}, got {quoted(value, 60)}"
            ) from None
        if self.choices is not None and v not in self.choices:
            raise MethodParameterError(f"{where}: '{self.name}' must be {self.describe_range()}, got {v!r}")
        if self.kind in (int, float):
            bad = False
            if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
                bad = True
            if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
                bad = True
            if bad:
                raise MethodParameterError(
                    f"{where}: '{self.name}' must be {self.describe_range()}, got {v!r}"
                )
        return v


    def _filters(self, value: dict[str, Any], where: str) -> Filters:
        """``{filters: [{filter: str | None, value: number | list}, ...], other: number | list}`` checked."""
        flist = value["filters"]
        if set(value) - {"filters", "other"} or not isinstance(flist, list | tuple) or not flist:
            raise MethodParameterError(
                f"{where}: '{self.name}': filters are written {{filters: [{{filter: name-part, value: v}}, ...], "
                f"other: v}}, got {quoted(value, 60)}")
        from omnimerge.components import COMPONENTS

        entries: list[tuple[str | None, float | Schedule, str | None]] = []
        for e in flist:
            if not isinstance(e, dict) or "value" not in e or set(e) - {"filter", "value", "component"} \
                    or not (e.get("filter") is None or isinstance(e["filter"], str)) \
                    or isinstance(e["value"], dict):
                raise MethodParameterError(
                    f"{where}: '{self.name}': a filter entry is {{filter: name-part, value: number or list}} "
                    f"(and optionally component: NAME), got {quoted(e, 60)}")
            comp = e.get("component")
            if comp is not None and comp not in COMPONENTS:
                raise MethodParameterError(f"{where}: '{self.name}': component {quoted(comp, 40)} is not one of "
                                           f"{', '.join(COMPONENTS)}")
            flt = None if e.get("filter") in (None, "*") else e["filter"]
            entries.append((flt, self.validate(e["value"], where), comp))  # type: ignore[arg-type]
        other: Any = self.default
        if "other" in value:
            if isinstance(value["other"], dict):
                raise MethodParameterError(f"{where}: '{self.name}': filters' other is a number or a list, got "
                                           f"{quoted(value['other'], 60)}")
            other = self.validate(value["other"], where)
        return Filters(tuple(entries), other)


@dataclass
class TensorContext:
    """What a method may know about the parameter it merges, besides the tensors themselves.

    Attributes:
        name: the tensor's name in the base checkpoint.
        canonical: its normalised name (the same across transformers versions).
        component: its component (``language_model``, ``norm``, ``vision_tower``, ... see omnimerge.components).
        num_models: number of experts T.
        factors: per expert, an exact :class:`LowRank` factorisation of its task vector when one is known
            (LoRA inputs), else ``None``.
        stats: the result of the method's global pass (see :class:`GlobalPass`), or ``None``.
        seed: the method's ``seed`` parameter, if it has one (methods with randomness use :meth:`generator`).
        layer: the index of the layer the tensor belongs to (``...layers.<i>...``), None outside the layers.
        num_layers: the depth of that layer stack in the base (0 outside the layers).
        offset: for methods that declare ``elementwise``: the flat index of the first entry of the block they
            are given (the engine may stream a tensor in blocks); 0 for a whole tensor.
        log: a callable for one-line notes the method wants the user to see (printed once per distinct text).
        statistics: for methods that declare :class:`Statistics`: per expert, this tensor's statistic (float32 on
            the compute device), or None where the expert's file has none for it (allowed only where the
            declaration's ``shape`` says the tensor takes none); None for other methods.
    """

    name: str
    canonical: str = ""
    component: str = "other"
    num_models: int = 0
    factors: Sequence[LowRank | None] | None = None
    stats: Any = None
    seed: int = 0
    layer: int | None = None
    num_layers: int = 0
    offset: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None)
    info: dict[str, Any] = field(default_factory=dict)
    statistics: Sequence[torch.Tensor | None] | None = None

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, tensor name): deterministic whatever order tensors are merged in."""
        digest = hashlib.sha256(f"{self.seed}:{self.canonical or self.name}".encode()).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g

    def low_rank(self, i: int) -> LowRank | None:
        if self.factors is None:
            return None
        return self.factors[i]


class GlobalPass:
    """A statistic a method needs over *all* merged tensors before it can merge any (e.g. global TIES).

    The engine runs ``passes`` sweeps over the selected tensors; in sweep ``p`` it calls
    ``update(p, state, task_vectors, ctx)`` for each tensor, then ``finish(p, state)``. ``result(state)`` is handed
    to every per-tensor call as ``ctx.stats``. ``state`` starts as ``init(num_models, params)``.
    """

    passes: int = 1
    #: whether ``update`` needs the task vectors (False: the engine passes an empty list and reads no weights,
    #: e.g. a pass over the experts' statistics only)
    reads_tensors: bool = True

    def init(self, num_models: int, params: Mapping[str, Any]) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, p: int, state: Any, task_vectors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
        raise NotImplementedError  # pragma: no cover - interface

    def finish(self, p: int, state: Any) -> None:
        return None

    def result(self, state: Any) -> Any:
        return state

    def needed(self, params: Mapping[str, Any]) -> bool:
        """Whether this configuration of the method needs the global pass at all."""
        return True


MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Statistics:
    """The per-expert statistics a data-aware method reads (``models[i].statistics``; see
    :mod:`omnimerge.checkpoint.statistics`).

    Attributes:
        kind: the file's ``statistic`` metadata value (``regmean_gram``, ``fisher_diagonal``).
        shape: ``shape(name, weight_shape, component) -> expected shape | None``: the statistic's shape for a merged
            tensor, or None where the method takes no statistic for such a tensor (it then leaves it at the
            base if the file has none). A merged tensor with an expected shape must be in every expert's file.
    """

    kind: str
    shape: Callable[[str, tuple[int, ...], str], tuple[int, ...] | None]


@dataclass(frozen=True)
class TaskMasks:
    """One tensor's per-task masks of a unified merge: task t's model is
    W_t = W0 + r_t (masks[t] * tau_uni), tau_uni the unified task vector (the merged delta / scaling) and r_t
    = sum l1_tau[t] / sum l1_kept[t] over every merged tensor (1 where ``rescale`` is false)."""

    masks: list[torch.Tensor]  # bool, the tensor's shape, one per expert
    l1_tau: list[float]  # per expert: sum |tau_t| over this tensor
    l1_kept: list[float]  # per expert: sum |masks[t] * tau_uni| over this tensor
    rescale: bool = True


@dataclass(frozen=True)
class Capabilities:
    """What the engine may do with a method besides calling ``fn`` on whole tensors; each gives the same bits.

    Attributes:
        elementwise: each output entry depends only on the same entry of the inputs (and a NaN/Inf in any task
            vector reaches the delta): the engine may merge the tensor block by block (``ctx.offset`` is the
            flat index of the block's first entry).
        linear: ``linear(params) -> (c, op) | None``: for these parameters the delta is ``op(sum_i tau_i, c)``
            with op ``"mul"``, ``"div"`` or ``"none"``, so a compiled fused kernel with the same float32
            operations applies; None where the form does not hold (e.g. non-unit weights).
        from_weights: the method as ``fn(weights, ctx, **params) -> W`` of the experts' weights alone (the
            merged weight, not a delta): used when every expert is a full checkpoint; the base is then not read.
        blockwise: a streamed implementation (see :class:`omnimerge.methods.operators.SparseBlockwise` for the
            protocol) used for tensors of at least ``blockwise_min_numel`` entries.
        compiled: the name of the compiled kernel family that runs the streamed implementation (``"ties"``).
        task_masks: ``task_masks(task_vectors, ctx, **params) -> TaskMasks``: the per-task masks (and rescaler
            sums) that rebuild each expert's task-specific model from the unified merge (EMR); the task vectors
            must not be modified. Used with the recipe's ``task_models: true``.
    """

    elementwise: bool = False
    linear: Callable[[Mapping[str, Any]], tuple[float, str] | None] | None = None
    from_weights: MethodFn | None = None
    blockwise: Any = None
    blockwise_min_numel: int = 1 << 18
    compiled: str | None = None
    task_masks: Callable[..., TaskMasks] | None = None

    def describe(self) -> list[str]:
        """The declared capabilities in words (for ``omnimerge methods``)."""
        out = []
        if self.elementwise:
            out.append("streams block by block")
        if self.linear is not None:
            out.append("compiled linear kernel")
        if self.from_weights is not None:
            out.append("computed from the experts' weights alone")
        if self.blockwise is not None:
            out.append("streamed implementation" + (f" (compiled: {self.compiled})" if self.compiled else ""))
        if self.task_masks is not None:
            out.append("per-task models from the unified merge (task_models: true)")
        return out


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function, declared parameters and provenance."""

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    summary: str
    paper: str
    url: str = ""
    global_pass: GlobalPass | None = None
    #: "dense" (the default: one merged model) or "online" (keeps the experts' adapters apart; see modality).
    output_kind: str = "dense"
    capabilities: Capabilities = field(default_factory=Capabilities)
    #: a check of the resolved parameters taken together (raises MethodParameterError), run before any work
    check: Callable[[Mapping[str, Any]], None] | None = None
    #: how many experts the method merges: (at least, at most; None: no limit), checked before any work
    experts: tuple[int, int | None] = (1, None)
    #: the per-expert statistics the method reads (data-aware methods), or None
    statistics: Statistics | None = None

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def refusal(self, n_experts: int) -> str | None:
        """Why this method cannot merge ``n_experts`` experts with its default parameters (None: it can). Lists
        that run every method (the benchmarks) leave out the ones refused, saying why. A data-aware method is
        refused here: it needs each expert's statistics besides the parameters."""
        if self.statistics is not None:
            return (f"method '{self.name}' needs each expert's '{self.statistics.kind}' statistics "
                    f"(models[].statistics, from `omnimerge stats`)")
        try:
            self.resolve({}, [{}] * n_experts)
        except MethodParameterError as e:
            return str(e)
        return None

    def resolve(
        self, params: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]], where: str = "parameters"
    ) -> dict[str, Any]:
        """Validate the recipe's values against the declaration; return the keyword arguments for ``fn``.

        ``params`` are the top-level ``parameters``; ``per_model`` the ``models[i].parameters``. Unknown names,
        wrong types and out-of-range values raise :class:`MethodParameterError` naming the parameter.
        """
        lo, hi = self.experts
        if len(per_model) < lo or (hi is not None and len(per_model) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise MethodParameterError(
                f"models: method '{self.name}' merges the base with {want} expert{'s' if hi != 1 else ''}; "
                f"the recipe lists {len(per_model)}")
        known = {p.name: p for p in self.params}
        for key in params:
            if key not in known:
                raise MethodParameterError(
                    f"{where}: method '{self.name}' has no parameter '{key}' "
                    f"(it takes: {', '.join(sorted(known)) or 'none'})"
                )
        for i, mp in enumerate(per_model):
            for key in mp:
                if key not in known:
                    raise MethodParameterError(
                        f"models[{i}].parameters: method '{self.name}' has no parameter '{key}' "
                        f"(it takes: {', '.join(sorted(known)) or 'none'})"
                    )
                if not known[key].per_model:
                    raise MethodParameterError(
                        f"models[{i}].parameters: '{key}' of method '{self.name}' is one value for all "
                        f"models; set it under the top-level 'parameters'"
                    )
        out: dict[str, Any] = {}
        for p in self.params:
            top = p.validate(params[p.name], f"{where}") if p.name in params else p.default
            if p.per_model:
                vals = []
                for i, mp in enumerate(per_model):
                    vals.append(p.validate(mp[p.name], f"models[{i}].parameters") if p.name in mp else top)
                out[p.name] = tuple(vals)
            else:
                out[p.name] = top
        if self.check is not None and not has_schedule(out):  # with schedules: per tensor, when planned
            self.check(out)
        return out


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    summary: str,
    paper: str,
    url: str = "",
    global_pass: GlobalPass | None = None,
    output_kind: str = "dense",
    capabilities: Capabilities | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    experts: tuple[int, int | None] = (1, None),
    statistics: Statistics | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as merge method ``name`` (decorator)."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            params=tuple(params),
            summary=summary,
            paper=paper,
            url=url,
            global_pass=global_pass,
            output_kind=output_kind,
            capabilities=capabilities or Capabilities(),
            check=check,
            experts=experts,
            statistics=statistics,
        )
        return fn

    return deco


def registry() -> dict[str, MergeMethod]:
    return _REGISTRY


# --- shared helpers for method implementations -------------------------------------------------------------

SCALING_DOC = "lambda: multiplies the merged task vector (W = W0 + lambda * tau_merged)"


def scaling_param(default: float | None = 1.0, nullable: bool = False) -> Param:
    return Param("scaling", default, SCALING_DOC, float, low=0.0, nullable=nullable)


def mean_of(task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Incremental mean acc <- acc + (tau_i - acc)/i, the references' rule for non-2-D parameters."""
    acc = task_vectors[0].clone()
    for i, tv in enumerate(task_vectors[1:], start=2):
        acc.add_(tv - acc, alpha=1.0 / i)
    return acc


def is_matrix(ctx: TensorContext, t: torch.Tensor) -> bool:
    """True for 2-D parameters other than the lm_head: the ones the spectral/optimisation methods act on."""
    return t.dim() == 2 and ctx.component != "lm_head" and "lm_head" not in ctx.name
