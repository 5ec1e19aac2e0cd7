"""PEFT LoRA adapters: exact task vectors as experts, and merged models written as LoRA adapters.

**Inputs.** A recipe model entry that is a PEFT adapter folder (``adapter_config.json`` plus
``adapter_model.safetensors`` or ``adapter_model.bin``) is opened as an :class:`AdapterSource`. Its task vector
is what ``peft``'s ``merge_and_unload()`` adds to the base, computed one module at a time in the space where the
adapter acts, never by merging the A and B factors separately:

* a LoRA module: ``tau = s * B @ A`` with ``s = lora_alpha / r`` (``use_rslora``: ``lora_alpha / sqrt(r)``),
  ``r`` and ``lora_alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern`` with peft's matching rule;
  embedding LoRA (``lora_embedding_A/B``) and ``fan_in_fan_out`` layers use ``tau = s * (B @ A)^T``. The exact
  factors go to the merge method as :class:`~omnimerge.types.LowRank` (spectral methods take their SVD
  from them);
* DoRA: ``tau = m / ||W0 + s B A||_row * (W0 + s B A) - W0`` (the magnitude vector renormalises every output
  row, as peft merges it); exact, dense, no factors;
* ``lora_bias=True``: the bias gets ``s * lora_B.bias``;
* full tensors saved in the adapter (``modules_to_save``, biases trained with ``bias: all / lora_only``, the
  embedding ``base_layer`` weights saved with ``save_embedding_layers``) replace the base's: ``tau = saved - W0``.

Tensors the adapter does not touch have ``tau = 0`` (``task_vector`` returns ``None``). Adapter module names are
the in-memory names of the model it was made on (``model.language_model.layers.0.self_attn.q_proj`` in
transformers >= 4.52, ``language_model.model.layers...`` or ``model.layers...`` before); they are matched to the
base's tensors through canonical names (:mod:`omnimerge.checkpoint.names`), so adapters and bases of any layout
line up. :meth:`AdapterSource.validate` checks everything against the base before any tensor is merged: every
module exists in the base, every factor's shape fits the base weight, the rank agrees with the config, and the
adapter's ``base_model_name_or_path`` names the base. Adapter features whose merge is not a fixed weight change
(aLoRA, Arrow routing, VeLoRA, MonteCLoRA, KaSA, BD-LoRA, MiCA, trainable tokens, ``target_parameters``,
``layer_replication``) or whose factors are relative to a modified base (PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA
initialisation without conversion) are refused with a message naming the field.

**Output** (``output: lora`` with ``rank: R``): :func:`write_lora_output` merges tensor by tensor, as a full
merge does, and factorises each merged 2-D weight delta by a truncated SVD, ``B = U_r sqrt(S_r)``,
``A = sqrt(S_r) V_r^T`` with ``r = min(R, numerical rank)`` and ``lora_alpha = r`` (scale 1; modules with
``r < R`` are listed in ``rank_pattern`` / ``alpha_pattern``). Linear layers get ``lora_A/lora_B``, embeddings
``lora_embedding_A/B``. Changed tensors that LoRA cannot hold (norm weights, biases) are saved whole through
``modules_to_save`` (their module is then stored whole, as peft requires); a changed parameter that does not
belong to a leaf module is refused. Module names are the in-memory names of the installed transformers version
(found by building the base architecture on the meta device), which is what peft matches against. The relative
approximation error ``||dW - B A||_F / ||dW||_F`` per module kind is printed and recorded in the report.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnimerge.checkpoint.names import canonical_name
from omnimerge.checkpoint.reader import (
    Checkpoint,
    TensorMeta,
    parse_safetensors_header,
    read_json,
    regular_file,
)
from omnimerge.errors import CheckpointError, OutputError, RecipeError, TensorMismatchError, quoted
from omnimerge.types import LowRank

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
#: LoRA variants whose effect is not a fixed weight change (or which need data at inference): refused.
_REFUSED_FIELDS: dict[str, str] = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) only acts after its invocation tokens",
    "arrow_config": "Arrow routes tokens among adapters at inference",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_bdlora": "BD-LoRA",
    "use_qalora": "QA-LoRA (quantisation-aware, for GPTQ bases)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "layer_replication": "layer replication (the adapted model has more layers than the base)",
}
#: init_lora_weights values that change the base weights: the saved factors are relative to that changed base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --- reading adapter folders ---------------------------------------------------------------------------------


@dataclass
class LoraModule:
    """One LoRA-adapted module of an adapter (keys are the adapter file's tensor names)."""

    name: str  # module path as saved (without the ``base_model.model.`` prefix)
    kind: str = "linear"  # "linear" or "embedding"
    A: str | None = None
    B: str | None = None
    magnitude: str | None = None  # DoRA
    bias: str | None = None  # lora_B.bias (lora_bias=True)
    r: int = 0
    alpha: float = 0.0
    scale: float = 1.0

    @property
    def weight_canonical(self) -> str:
        return canonical_name(f"{self.name}.weight")

    @property
    def bias_canonical(self) -> str:
        return canonical_name(f"{self.name}.bias")


@dataclass
class FullTensor:
    """A whole tensor saved in the adapter, replacing the base's (modules_to_save, trained biases, ...)."""

    key: str  # tensor name in the adapter file
    name: str  # parameter name (prefix and wrapper levels stripped)
    origin: str


def _positive(where: str, key: str, v: Any, integer: bool) -> None:
    """A rank (a positive integer) or an alpha (a positive finite number), else one line naming the key."""
    ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v > 0
    if ok and integer:
        ok = float(v).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise CheckpointError(f"{where}: '{key}' must be {kind}, got {quoted(v, 60)}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key`` rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return patterns[key]
        except re.error:
            if module == key or module.endswith("." + key):
                return patterns[key]
    return default


def _is_base_changing_init(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith(_BASE_CHANGING_INITS)


class AdapterFiles:
    """A PEFT LoRA adapter folder, parsed and checked on its own (no base needed): config, tensor headers,
    modules with their rank, alpha and scale. Tensors are read on demand."""

    def __init__(self, path: Path, ref: str | None = None) -> None:
        self.path = Path(path)
        self.ref = ref or str(path)
        self.config_file = self.path / ADAPTER_CONFIG
        if not self.config_file.is_file():
            raise CheckpointError(f"{self.path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        self.config: dict[str, Any] = read_json(self.config_file, self.path)
        self._check_config()
        self.file = self._weights_file()
        self.metas: dict[str, TensorMeta] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        if self.file.suffix == ".safetensors":
            self.metas, _ = parse_safetensors_header(self.file)
        else:
            self._bin = self._load_bin(self.file)
            self.metas = {k: TensorMeta(k, t.dtype, tuple(t.shape), self.file) for k, t in self._bin.items()}
        if not self.metas:
            raise CheckpointError(f"{self.file}: the adapter holds no tensors")
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, FullTensor] = {}
        self._parse_keys()
        self._resolve_ranks()

    # -- config -------------------------------------------------------------------------------------------------
    def _check_config(self) -> None:
        c, where = self.config, self.config_file
        ptype = str(c.get("peft_type", "")).upper()
        if ptype != "LORA":
            raise CheckpointError(
                f"{where}: peft_type is {c.get('peft_type')!r}; omnimerge merges LoRA adapters only (peft_type LORA)"
            )
        for key, what in _REFUSED_FIELDS.items():
            v = c.get(key)
            if v not in (None, False, [], {}, "", 0):
                raise CheckpointError(
                    f"{where}: '{key}' is set ({what}); such an adapter is not a fixed weight change and cannot be "
                    f"merged"
                )
        init = c.get("init_lora_weights", True)
        if init == "mica":
            raise CheckpointError(f"{where}: init_lora_weights 'mica' (a LoRA variant) is not supported")
        if _is_base_changing_init(init):
            raise CheckpointError(
                f"{where}: init_lora_weights={init!r} changes the base weights when the adapter is created, so its "
                f"factors are relative to that changed base, not to the base model; convert it first with peft "
                f"(save_pretrained(..., path_initial_model_for_weight_conversion=...)), which gives a plain LoRA"
            )
        for key in ("r", "lora_alpha"):
            _positive(where, key, c.get(key), integer=key == "r")
        for key in ("rank_pattern", "alpha_pattern"):
            v = c.get(key) or {}
            if not isinstance(v, dict):
                raise CheckpointError(f"{where}: '{key}' must be a mapping, got {type(v).__name__}")
            for k, x in v.items():
                _positive(where, f"{key}[{quoted(k, 40)}]", x, integer=key == "rank_pattern")
        if c.get("bias") not in (None, "none", "all", "lora_only"):
            raise CheckpointError(f"{where}: unknown 'bias' value {c.get('bias')!r}")

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def base_model_name(self) -> str | None:
        v = self.config.get("base_model_name_or_path")
        return str(v) if v else None

    def _weights_file(self) -> Path:
        for name in ADAPTER_WEIGHTS:
            f = self.path / name
            if f.exists() or f.is_symlink():
                return regular_file(f, self.path)  # never a FIFO, nor a link out of the folder
        raise CheckpointError(
            f"{self.path}: PEFT adapter without weights (expected {' or '.join(ADAPTER_WEIGHTS)} beside "
            f"{ADAPTER_CONFIG})"
        )

    @staticmethod
    def _load_bin(f: Path) -> dict[str, torch.Tensor]:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle / zip errors of many kinds
            raise CheckpointError(f"{f}: corrupt adapter weights file (cannot load it, weights_only): {e}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{f}: corrupt adapter weights file (expected a state dict of tensors)")
        return sd

    # -- keys ---------------------------------------------------------------------------------------------------
    def _parse_keys(self) -> None:
        where = self.file
        for key, meta in self.metas.items():
            if not meta.dtype.is_floating_point:
                raise CheckpointError(f"{where}: tensor '{key}' has dtype {meta.dtype}; adapter weights are floats")
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            parts = name.split(".")
            idx = next((i for i, p in enumerate(parts) if p in _LORA_PARTS), None)
            if idx is None:
                if any(p.startswith("lora_") for p in parts):
                    raise CheckpointError(
                        f"{where}: tensor '{key}' is a LoRA-variant parameter omnimerge does not know how to merge"
                    )
                if "trainable_tokens_delta" in parts or "token_adapter" in parts:
                    raise CheckpointError(f"{where}: tensor '{key}' holds trainable tokens, which are not supported")
                if "original_module" in parts:
                    continue  # the untouched copy kept by a modules_to_save wrapper
                origin = "full tensor"
                if "modules_to_save" in parts:
                    i = parts.index("modules_to_save")
                    parts = parts[:i] + parts[i + 2:]
                    origin = "modules_to_save"
                if "base_layer" in parts:
                    parts = [p for p in parts if p != "base_layer"]
                    origin = "base_layer"
                elif parts[-1] == "bias" and origin == "full tensor":
                    origin = "trained bias"
                full = ".".join(parts)
                canon = canonical_name(full)
                if canon in self.full:
                    raise CheckpointError(
                        f"{where}: tensors '{self.full[canon].key}' and '{key}' are the same parameter '{full}'"
                    )
                self.full[canon] = FullTensor(key, full, origin)
                continue
            module = ".".join(parts[:idx])
            part = parts[idx]
            rest = parts[idx + 1:]
            param = rest[-1] if rest and rest[-1] in ("weight", "bias") else None
            if len(rest) > 2 or (len(rest) == 2 and param is None) or not module:
                raise CheckpointError(f"{where}: cannot read LoRA tensor name '{key}'")
            m = self.modules.setdefault(module, LoraModule(module))
            if part in ("lora_A", "lora_B") and param == "bias":
                if part != "lora_B":
                    raise CheckpointError(f"{where}: unexpected LoRA tensor '{key}'")
                m.bias = key
                continue
            if part.startswith("lora_embedding_"):
                m.kind = "embedding"
            slot = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
                    "lora_magnitude_vector": "magnitude"}[part]
            if getattr(m, slot) is not None:
                raise CheckpointError(f"{where}: module '{module}' has two '{part}' tensors")
            setattr(m, slot, key)
        for m in self.modules.values():
            if m.A is None or m.B is None:
                missing = "lora_A" if m.A is None else "lora_B"
                raise CheckpointError(f"{where}: module '{m.name}' has no {missing} tensor (corrupt adapter?)")
            if m.magnitude is not None and (m.kind != "linear" or self.fan_in_fan_out):
                raise CheckpointError(
                    f"{where}: module '{m.name}': DoRA on {'fan_in_fan_out layers' if m.kind == 'linear' else 'embeddings'}"
                    f" is not supported"
                )
            if m.magnitude is not None and m.weight_canonical in self.full:
                raise CheckpointError(f"{where}: module '{m.name}': DoRA together with a saved base layer")
        if self.use_dora and not any(m.magnitude for m in self.modules.values()):
            raise CheckpointError(f"{where}: use_dora is set but the file has no lora_magnitude_vector tensors")
        if not self.modules and not self.full:
            raise CheckpointError(f"{where}: no LoRA tensors found")

    def _resolve_ranks(self) -> None:
        c = self.config
        rp, ap = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        for m in self.modules.values():
            r = _pattern_value(rp, m.name, c["r"])
            alpha = _pattern_value(ap, m.name, c["lora_alpha"])
            a_meta, b_meta = self.metas[m.A], self.metas[m.B]  # type: ignore[index]
            if len(a_meta.shape) != 2 or len(b_meta.shape) != 2:
                raise CheckpointError(
                    f"{self.file}: module '{m.name}': LoRA factors must be 2-D, found lora_A {list(a_meta.shape)} "
                    f"and lora_B {list(b_meta.shape)} (only linear and embedding layers are supported)"
                )
            if a_meta.shape[0] != b_meta.shape[1]:
                raise CheckpointError(
                    f"{self.file}: module '{m.name}': lora_A {list(a_meta.shape)} and lora_B {list(b_meta.shape)} "
                    f"disagree on the rank"
                )
            if a_meta.shape[0] != int(r):
                raise CheckpointError(
                    f"{self.file}: module '{m.name}': {ADAPTER_CONFIG} gives rank {r} (r / rank_pattern) but "
                    f"lora_A has {a_meta.shape[0]} rows"
                )
            m.r, m.alpha = int(r), float(alpha)
            m.scale = m.alpha / (math.sqrt(m.r) if self.use_rslora else m.r)

    # -- tensors ------------------------------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        """The adapter tensor ``key`` (a fresh CPU tensor)."""
        if self._bin is not None:
            return self._bin[key]
        m = self.metas[key]
        n = m.end - m.begin
        if n == 0:
            return torch.empty(m.shape, dtype=m.dtype)
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{self.file}: cannot open ({e.strerror or e})") from None
            fd = self._fd
        buf = bytearray(os.pread(fd, n, m.begin))
        if len(buf) != n:
            raise CheckpointError(f"{self.file}: truncated while reading tensor '{key}'")
        return torch.frombuffer(buf, dtype=m.dtype).reshape(m.shape)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# --- the expert source ------------------------------------------------------------------------------------------


def _name_tokens(s: str | None) -> set[str]:
    """Comparable tokens of a model reference: its last path component (lower case) and, for a Hugging Face
    cache path (``models--org--name/snapshots/<hash>``), the repository name."""
    if not s:
        return set()
    parts = [p for p in re.split(r"[/\\]", s.strip()) if p]
    if not parts:
        return set()
    toks = {parts[-1].lower()}
    for p in parts:
        if p.startswith("models--"):
            toks.add(p.split("--")[-1].lower())
    return {t for t in toks if t and not re.fullmatch(r"[0-9a-f]{40}", t)}


def _ties_embeddings(base: Checkpoint) -> bool:
    cfg = base.config
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


class AdapterSource:
    """A PEFT LoRA adapter as an expert: exact task vectors ``s * B @ A`` one module at a time (see the module
    docstring for DoRA, embeddings, biases and saved full tensors)."""

    kind = "adapter"

    def __init__(self, files: AdapterFiles, label: str) -> None:
        self.files = files
        self.ref = files.ref
        self.path = files.path
        self.label = label
        self.config = files.config
        self._by_weight = {m.weight_canonical: m for m in files.modules.values()}
        self._by_bias = {m.bias_canonical: m for m in files.modules.values() if m.bias is not None}

    # -- validation ---------------------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"adapter '{self.ref}' ({self.files.file})"

    def _check_base_name(self, base: Checkpoint) -> None:
        theirs = self.files.base_model_name
        if not theirs:
            return
        ours: set[str] = set()
        for s in (base.ref, str(base.path), str(base.config.get("_name_or_path") or "")):
            ours |= _name_tokens(s)
        mine = _name_tokens(theirs)
        if mine and ours and not (mine & ours):
            raise CheckpointError(
                f"{self._where()} was made for the base '{theirs}' (base_model_name_or_path in "
                f"{self.files.config_file.name}), not for '{base.ref}'. If it really was trained on this base, set "
                f"base_model_name_or_path in {self.files.config_file} to '{base.ref}'"
            )

    def validate(self, base: Checkpoint, selected: list[str]) -> list[str]:
        self._check_base_name(base)
        where = self._where()
        f = self.files
        touched: list[str] = []

        def base_tensor(canon: str, what: str) -> str:
            name = base.find(canon)
            if name is None and canon == "lm_head.weight" and _ties_embeddings(base):
                raise TensorMismatchError(
                    f"{where}: {what}: the base '{base.ref}' ties lm_head to the input embeddings (no lm_head "
                    f"tensor is stored); changing a tied lm_head is not supported"
                )
            if name is None:
                raise TensorMismatchError(
                    f"{where}: {what} is missing from the base '{base.ref}' (no tensor '{canon}' under any naming "
                    f"layout) — the adapter was made for another model"
                )
            return name

        for m in f.modules.values():
            bname = base_tensor(m.weight_canonical, f"target module '{m.name}'")
            shape = tuple(base.tensors[bname].shape)
            a, b = f.metas[m.A].shape, f.metas[m.B].shape  # type: ignore[index]
            if len(shape) != 2:
                raise TensorMismatchError(
                    f"{where}: target module '{m.name}': the base's '{bname}' has shape {list(shape)}; only 2-D "
                    f"(linear / embedding) weights can carry LoRA"
                )
            if m.kind == "embedding":
                num, dim = shape
                exp_a, exp_b = (m.r, num), (dim, m.r)
            elif f.fan_in_fan_out:
                inn, out = shape
                exp_a, exp_b = (m.r, inn), (out, m.r)
            else:
                out, inn = shape
                exp_a, exp_b = (m.r, inn), (out, m.r)
            for label, got, exp in (("lora_A", a, exp_a), ("lora_B", b, exp_b)):
                if tuple(got) != exp:
                    raise TensorMismatchError(
                        f"{where}: module '{m.name}': {label} has shape {list(got)}, expected {list(exp)} for the "
                        f"base's '{bname}' of shape {list(shape)} — the adapter was made for another base"
                    )
            if m.magnitude is not None:
                mag = tuple(f.metas[m.magnitude].shape)
                if mag not in ((shape[0],), (1, shape[0])):
                    raise TensorMismatchError(
                        f"{where}: module '{m.name}': lora_magnitude_vector has shape {list(mag)}, expected "
                        f"[{shape[0]}] for the base's '{bname}'"
                    )
            touched.append(bname)
            if m.bias is not None:
                bb = base_tensor(m.bias_canonical, f"the bias of module '{m.name}' (lora_bias)")
                if tuple(base.tensors[bb].shape) != tuple(f.metas[m.bias].shape):
                    raise TensorMismatchError(
                        f"{where}: module '{m.name}': lora_B.bias has shape {list(f.metas[m.bias].shape)}, the base's "
                        f"'{bb}' {list(base.tensors[bb].shape)}"
                    )
                touched.append(bb)
        for canon, ft in f.full.items():
            bname = base_tensor(canon, f"tensor '{ft.name}' ({ft.origin})")
            got, exp = tuple(f.metas[ft.key].shape), tuple(base.tensors[bname].shape)
            if got != exp:
                raise TensorMismatchError(
                    f"{where}: tensor '{ft.key}' ({ft.origin}) has shape {list(got)}, the base's '{bname}' has "
                    f"{list(exp)} — the adapter was made for another base"
                )
            touched.append(bname)
        notes = []
        sel = set(selected)
        left = [n for n in dict.fromkeys(touched) if n not in sel]
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            notes.append(
                f"adapter '{self.label}' changes {len(left)} tensor(s) the recipe does not select, e.g. '{left[0]}'"
                f"{more}: they keep the base's values (widen select.include to merge them)"
            )
        if not f.base_model_name:
            notes.append(
                f"adapter '{self.label}' does not record its base (base_model_name_or_path is empty): only shapes "
                f"were checked"
            )
        return notes

    # -- task vectors -------------------------------------------------------------------------------------------
    def factors(self, m: LoraModule, dtype: torch.dtype, device: torch.device) -> LowRank:
        """Exact factors of module ``m``'s weight delta in the base weight's orientation."""
        A = self.files.tensor(m.A).to(device=device, dtype=dtype)  # type: ignore[arg-type]
        B = self.files.tensor(m.B).to(device=device, dtype=dtype)  # type: ignore[arg-type]
        if m.kind == "embedding" or self.files.fan_in_fan_out:
            # delta = s * (B @ A)^T = s * A^T @ B^T
            return LowRank(A.T.contiguous(), B.T.contiguous(), m.scale)
        return LowRank(B, A, m.scale)

    def task_vector(
        self, base_name: str, canonical: str, base: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor | None, LowRank | None]:
        m = self._by_weight.get(canonical)
        mb = self._by_bias.get(canonical)
        ft = self.files.full.get(canonical)
        if m is None and mb is None and ft is None:
            return None, None
        tv: torch.Tensor | None = None
        lr: LowRank | None = None
        if ft is not None:
            tv = self.files.tensor(ft.key).to(device=device, dtype=dtype, copy=True)
            tv.sub_(base)
        if m is not None:
            f = self.factors(m, dtype, device)
            delta = f.dense()
            if m.magnitude is not None:
                mag = self.files.tensor(m.magnitude).to(device=device, dtype=dtype).reshape(-1)
                merged = base + delta
                norm = torch.linalg.norm(merged, dim=1)
                merged.mul_((mag / norm).unsqueeze(1))
                delta = merged.sub_(base)
            elif tv is None or not bool(tv.any()):
                lr = f
            tv = delta if tv is None else tv.add_(delta)
        if mb is not None:
            bias = self.files.tensor(mb.bias).to(device=device, dtype=dtype) * mb.scale  # type: ignore[arg-type]
            tv = bias if tv is None else tv.add_(bias)
        return tv, lr

    def input_files(self) -> list[Path]:
        return [self.files.file, self.files.config_file]

    def close(self) -> None:
        self.files.close()


def open_adapter(path: Path, ref: str, base: Checkpoint, label: str) -> AdapterSource:
    """Open a PEFT LoRA adapter folder as an expert (checked against ``base`` later, in ``validate``)."""
    return AdapterSource(AdapterFiles(Path(path), ref), label)


# --- inspect -----------------------------------------------------------------------------------------------------


def describe_adapter(folder: Path) -> Any:
    """A rich renderable summarising an adapter folder (``omnimerge inspect``)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    f = AdapterFiles(Path(folder))
    try:
        c = f.config
        flags = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias") if c.get(k)]
        head = Text.from_markup(
            f"[bold]{escape(str(folder))}[/]  PEFT LoRA adapter  r={escape(quoted(c.get('r'), 40))} "
            f"lora_alpha={escape(quoted(c.get('lora_alpha'), 40))}"
            f"{'  ' + ' '.join(flags) if flags else ''}\n"
            f"base_model_name_or_path={escape(str(f.base_model_name or '?'))}  "
            f"task_type={escape(str(c.get('task_type') or '-'))}  bias={escape(str(c.get('bias', 'none')))}\n"
            f"{escape(f.file.name)}: {f.file.stat().st_size / 1e6:.2f} MB, {len(f.metas)} tensors, "
            f"{len(f.modules)} LoRA modules, {len(f.full)} full tensors",
        )
        groups: dict[str, list[LoraModule]] = {}
        for m in f.modules.values():
            groups.setdefault(m.name.rsplit(".", 1)[-1], []).append(m)
        t = Table(header_style="bold")
        for col in ("module kind", "modules", "rank", "alpha", "scale", "example"):
            t.add_column(col)
        for kind, ms in groups.items():
            ranks = sorted({m.r for m in ms})
            alphas = sorted({m.alpha for m in ms})
            scales = sorted({round(m.scale, 6) for m in ms})
            t.add_row(
                escape(kind) + (" (DoRA)" if any(m.magnitude for m in ms) else "")
                + (" (embedding)" if ms[0].kind == "embedding" else ""),
                str(len(ms)), ",".join(map(str, ranks)), ",".join(f"{a:g}" for a in alphas),
                ",".join(f"{s:g}" for s in scales), escape(ms[0].name),
            )
        parts: list[Any] = [head, t]
        if f.full:
            ft = Table(header_style="bold")
            for col in ("full tensor", "origin", "shape"):
                ft.add_column(col)
            for x in f.full.values():
                ft.add_row(escape(x.name), escape(x.origin), str(list(f.metas[x.key].shape)))
            parts.append(ft)
        return Group(*parts)
    finally:
        f.close()


# --- LoRA output ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    """Where a parameter lives in the in-memory model: its name, its module, the module's kind."""

    path: str
    module: str
    attr: str
    kind: str  # "linear", "embedding", "other"
    leaf: bool


def _in_memory_layout(base: Checkpoint) -> dict[str, _Param] | None:
    """canonical name -> in-memory parameter of the base architecture, built on the meta device with the
    installed transformers (the names peft matches adapters against). None when it cannot be built."""
    try:
        import transformers

        if "auto_map" in base.config and base.model_type not in transformers.CONFIG_MAPPING:
            return None  # only the checkpoint's own code could build it: never run code from an input
        # trust_remote_code=False: transformers neither prompts nor imports the checkpoint's Python files
        cfg = transformers.AutoConfig.from_pretrained(str(base.path), trust_remote_code=False)
        archs = getattr(cfg, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if cls is None:
            return None
        with torch.device("meta"):
            model = cls(cfg)
    except Exception:  # noqa: BLE001 - remote code, unknown architectures, ...: fall back on names
        return None
    out: dict[str, _Param] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        kind = (
            "linear" if isinstance(mod, torch.nn.Linear)
            else "embedding" if isinstance(mod, torch.nn.Embedding) else "other"
        )
        leaf = not any(True for _ in mod.children())
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            out.setdefault(canonical_name(full), _Param(full, mname, pname, kind, leaf))
    return out


def _guess_param(canonical: str, base: Checkpoint, component: str, ndim: int) -> _Param:
    """Name-based fallback: canonical names are the in-memory names of transformers >= 4.52 VLMs; plain causal
    LMs keep ``model.layers``, Idefics3/SmolVLM ``model.text_model``."""
    path = canonical
    if path.startswith("model.language_model."):
        cfg = base.config
        if base.model_type in ("idefics3", "smolvlm"):
            path = "model.text_model." + path[len("model.language_model."):]
        elif "text_config" not in cfg and "vision_config" not in cfg and "audio_config" not in cfg:
            path = "model." + path[len("model.language_model."):]
    module, _, attr = path.rpartition(".")
    kind = "other"
    if attr == "weight" and ndim == 2:
        kind = "embedding" if component == "embedding" or re.search(r"embed", module.rsplit(".", 1)[-1]) else "linear"
    return _Param(path, module, attr, kind, True)


def _factorise(
    delta: torch.Tensor, rank: int, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD ``delta ~ U_r S_r V_r^T`` with r = min(rank, numerical rank); returns (U_r, S_r, Vh_r).

    Exact thin SVD (never ``full_matrices=True``); for a large matrix and a small rank, a randomized range finder
    with 16 extra columns and 4 power iterations (Halko et al. 2011), exact whenever rank(delta) <= rank + 16."""
    m, n = delta.shape
    k = min(m, n)
    x = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    q = rank + 16
    if k > 1024 and 2 * q < k:
        omega = torch.randn(n, q, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
        qm, _ = torch.linalg.qr(x @ omega)
        for _ in range(4):
            qn, _ = torch.linalg.qr(x.T @ qm)
            qm, _ = torch.linalg.qr(x @ qn)
        u, s, vh = torch.linalg.svd(qm.T @ x, full_matrices=False)
        u = qm @ u
    else:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0], s[:0], vh[:0]
    tol = float(s[0]) * max(m, n) * torch.finfo(x.dtype).eps
    r = min(rank, int((s > tol).sum()))
    return u[:, :r], s[:r], vh[:r]


@dataclass
class _LoraOut:
    rank: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)  # module -> rank
    full: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> attr -> merged value
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # module -> (||dW - BA||^2, ||dW||^2)
    zero: int = 0


def _add_lora(out: _LoraOut, p: _Param, canonical: str, dtype: torch.dtype, delta: torch.Tensor) -> None:
    digest = hashlib.sha256(canonical.encode()).digest()
    gen = torch.Generator(device=delta.device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    u, s, vh = _factorise(delta, out.rank, gen)
    r = int(s.shape[0])
    if r == 0:
        out.zero += 1
        return
    sq = s.sqrt()
    B = (u * sq).to(dtype).contiguous()
    A = (sq[:, None] * vh).to(dtype).contiguous()
    approx = B.to(delta.dtype) @ A.to(delta.dtype)
    err2 = float((delta.to(approx.dtype) - approx).pow(2).sum())
    norm2 = float(delta.pow(2).sum())
    del approx
    key = f"{PEFT_PREFIX}{p.module}"
    if p.kind == "embedding":
        # peft: delta = (lora_embedding_B @ lora_embedding_A)^T * scale, A: [r, num], B: [dim, r]
        out.tensors[f"{key}.lora_embedding_A"] = B.T.contiguous()
        out.tensors[f"{key}.lora_embedding_B"] = A.T.contiguous()
    else:
        out.tensors[f"{key}.lora_A.weight"] = A
        out.tensors[f"{key}.lora_B.weight"] = B
    out.targets[p.module] = r
    out.stats[p.module] = (err2, norm2)


#: (tensor name, canonical name, component, the adapter's dtype, shape) of a merged tensor the adapter may hold
LoraPlan = list[tuple[str, str, str, torch.dtype, tuple[int, ...]]]


class LoraAdapterSink:
    """A :class:`~omnimerge.sinks.Sink` that writes the merged change as a PEFT LoRA adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``) instead of a checkpoint.

    The engine sends each merged tensor whole (``whole_tensors``) in the compute dtype, W = W0 + dW; the sink reads
    W0 from the base, factorises each changed linear/embedding weight as dW ~ B A at rank ``rank`` (truncated SVD,
    :func:`_factorise`) and stores any other changed parameter of a leaf module whole (``modules_to_save``). A
    module whose bias or norm changed as well as its weight is stored whole (peft cannot both adapt a module and
    save it), so a module is decided once all its merged tensors have arrived; until then its tensors are held (a
    module's tensors are adjacent in the plan, so few are held at once). Safe to call from several threads."""

    whole_tensors = True

    def __init__(self, folder: Path, base: Checkpoint, plan: LoraPlan, rank: int, *, method: str, base_ref: str,
                 task_type: str | None, notes: Any) -> None:
        self.folder = Path(folder)
        self.base = base
        self.rank = int(rank)
        self.method = method
        self.base_ref = base_ref
        self.task_type = task_type
        self.notes = notes
        self.out = _LoraOut(self.rank)
        self.refused: list[str] = []
        self.summary: dict[str, Any] = {}
        self._lock = threading.Lock()
        layout = _in_memory_layout(base)
        self._param: dict[str, _Param] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._canonical: dict[str, str] = {}
        self._pending: dict[str, set[str]] = {}  # module -> planned tensors not arrived yet
        self._held: dict[str, dict[str, torch.Tensor]] = {}  # module -> tensor name -> merged value
        self._order = [name for name, *_ in plan]
        for name, canonical, component, dtype, shape in plan:
            p = (layout or {}).get(canonical) or _guess_param(canonical, base, component, len(shape))
            self._param[name], self._dtype[name], self._canonical[name] = p, dtype, canonical
            self._pending.setdefault(p.module, set()).add(name)
        self._whole: list[str] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        p = self._param.get(name)
        if p is None:
            raise OutputError(f"tensor '{name}' is not part of the planned adapter")
        with self._lock:
            pending = self._pending[p.module]
            if name not in pending:
                raise OutputError(f"tensor '{name}' written twice into the adapter")
            pending.discard(name)
            held = self._held.setdefault(p.module, {})
            held[name] = tensor
            ready = not pending
            if ready:
                del self._held[p.module]
        if ready:
            self._module(p.module, held)

    def _delta(self, name: str, merged: torch.Tensor) -> torch.Tensor:
        return merged - self.base.read(name).to(device=merged.device, dtype=merged.dtype)

    def _module(self, module: str, held: dict[str, torch.Tensor]) -> None:
        """Decide one module once all its merged tensors arrived: LoRA factors, stored whole, or refused."""
        deltas = {n: self._delta(n, t) for n, t in held.items()}
        changed = {n for n, d in deltas.items() if bool(d.any())}
        loras = [n for n in changed if self._param[n].kind in ("linear", "embedding")
                 and self._param[n].attr == "weight" and deltas[n].dim() == 2]
        others = [n for n in changed if n not in loras]
        full: dict[str, torch.Tensor] = {}
        refused = []
        for n in others:
            p = self._param[n]
            if p.module and p.leaf:
                full[p.attr] = held[n].to(self._dtype[n]).contiguous()
            else:
                refused.append(n)
        factors = _LoraOut(self.rank)
        whole = False
        for n in loras:
            if full:  # the module is saved whole: its weight too (exactly the merged value)
                full[self._param[n].attr] = held[n].to(self._dtype[n]).contiguous()
                whole = True
            else:
                _add_lora(factors, self._param[n], self._canonical[n], self._dtype[n], deltas[n])
        with self._lock:
            self.out.zero += len(held) - len(changed) + factors.zero
            self.refused += refused
            self.out.tensors.update(factors.tensors)
            self.out.targets.update(factors.targets)
            self.out.stats.update(factors.stats)
            if full:
                self.out.full[module] = full
            if whole:
                self._whole.append(module)

    def write_part(self, name: str, part: torch.Tensor, start: int, last: bool) -> None:
        raise OutputError(f"tensor '{name}': the LoRA adapter output takes whole tensors (whole_tensors)")

    def patch(self, name: str, index: Any, values: torch.Tensor) -> None:
        raise OutputError(f"tensor '{name}': the LoRA adapter output takes whole tensors (whole_tensors)")

    def copy_raw(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        raise OutputError(f"tensor '{name}': the LoRA adapter holds only merged changes (nothing is copied)")

    def finish(self) -> list[Path]:
        """Check every planned tensor arrived, write the adapter; the weights file. ``summary``: report fields."""
        missing = [n for ns in self._pending.values() for n in ns]
        if missing:
            raise OutputError(f"tensor '{sorted(missing)[0]}' was planned for the adapter but never written")
        out, rank = self.out, self.rank
        if self.refused:
            first = min(self.refused, key=self._order.index)
            more = f" (and {len(self.refused) - 1} more)" if len(self.refused) > 1 else ""
            raise RecipeError(
                f"output: lora cannot hold the merged change of '{first}'{more}: it is neither a linear/embedding "
                f"weight nor a parameter of a leaf module (modules_to_save); exclude it from select or use output: "
                f"full"
            )
        for module in sorted(self._whole):
            self.notes(f"output: lora: module '{module}' changed beyond its weight, so the adapter stores it whole "
                       f"(modules_to_save)")
        for module, params in out.full.items():
            for attr, t in params.items():
                out.tensors[f"{PEFT_PREFIX}{module}.{attr}"] = t
        if not out.targets and not out.full:
            raise OutputError(
                "output: lora: the merged model equals the base (every merged delta is zero): there is no adapter "
                "to write"
            )
        if not out.targets:
            raise OutputError(
                "output: lora: no linear or embedding weight changed, so the adapter would have no LoRA module "
                "(peft refuses such an adapter); use output: full"
            )
        from peft import LoraConfig
        from safetensors.torch import save_file

        rank_pattern = {re.escape(m): r for m, r in sorted(out.targets.items()) if r != rank}
        base_name = self.base_ref if "/snapshots/" in str(self.base.path) else str(self.base.path)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=sorted(out.targets),
            rank_pattern=rank_pattern,
            alpha_pattern=dict(rank_pattern),
            modules_to_save=sorted(out.full) or None,
            lora_dropout=0.0,
            bias="none",
            base_model_name_or_path=base_name,
            task_type=self.task_type,
            inference_mode=True,
        )
        cfg.save_pretrained(str(self.folder))
        weights = self.folder / ADAPTER_WEIGHTS[0]
        # one metadata key only: safetensors keeps the metadata in a hash map whose order changes from one call to
        # the next, so two keys would make reruns differ in their bytes (the method is in the model card)
        save_file(dict(sorted(out.tensors.items())), str(weights), metadata={"format": "pt"})
        module_errors = {m: math.sqrt(e / n) if n > 0 else 0.0 for m, (e, n) in sorted(out.stats.items())}
        by_kind: dict[str, list[float]] = {}
        for m, (e, n) in sorted(out.stats.items()):
            acc = by_kind.setdefault(m.rsplit(".", 1)[-1], [0.0, 0.0, 0.0])
            acc[0] += e
            acc[1] += n
            acc[2] = max(acc[2], module_errors[m])
        errors = {k: math.sqrt(a[0] / a[1]) if a[1] > 0 else 0.0 for k, a in by_kind.items()}
        summary = ", ".join(f"{k} {v:.3g} (max {by_kind[k][2]:.3g})" for k, v in errors.items())
        self.notes(
            f"output: lora rank {rank}: {len(out.targets)} LoRA modules"
            + (f", {len(out.full)} stored whole" if out.full else "")
            + f"; relative error ||dW - BA||_F/||dW||_F by module kind: {summary}"
        )
        self.summary = {
            "lora_rank": rank,
            "lora_modules": len(out.targets),
            "lora_modules_to_save": sorted(out.full),
            "lora_relative_error": errors,
            "lora_module_errors": module_errors,
            "output_bytes": weights.stat().st_size,
        }
        return [weights]

    def close(self) -> None:
        with self._lock:
            self._held.clear()


__all__ = [
    "AdapterFiles",
    "AdapterSource",
    "FullTensor",
    "LoraAdapterSink",
    "LoraModule",
    "describe_adapter",
    "open_adapter",
]

