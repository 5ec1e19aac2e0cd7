"""The modality suite: vision, audio and video experts on one small LLM, merged into an omni model.

A miniature of the OptMerge paper's modality benchmark (§4.5/§5.2 of the reference; ModelCompose's NaiveMC
experts on Vicuna), built offline on the CPU from real transformers architectures that share one Qwen2 LLM:

* **base**: a tiny ``Qwen2ForCausalLM`` pre-trained on *text* descriptions of the scenes ("beeps 3 rising
  circles 2 red beeps and circles ?" -> "3 2"): it knows the questions and answer formats, including the joint
  ones, but sees no modality.
* **audio expert**: ``Qwen2AudioForConditionalGeneration`` (its own Whisper-style encoder on 16-band
  spectrograms of synthesised tones, 25 audio tokens, its own projector): how many beeps (1-4), is the pitch
  rising or falling.
* **vision expert**: ``LlavaForConditionalGeneration`` (CLIP tower, 32 x 32 images, 16 image tokens,
  2-layer projector): how many circles, what colour are they.
* **video expert**: ``LlavaNextVideoForConditionalGeneration`` (its own CLIP tower on 4-frame clips, 2 x 2
  pooling, 16 video tokens): which way does the object move, what appears.

Each expert starts from the base LLM and fine-tunes it together with its freshly initialised encoder and
projector on its two tasks, and on the joint questions that involve its modality with **its own modality as
input and the other one given in words** (like instruction data that mixes the expert's modality with text).
**Joint tasks** need two modalities in one prompt, one per pair of modalities, each asking for a skill of both
that the base cannot read from the other encoder (counting, motion): ``joint_count`` (audio + image: "beeps and
circles ?" -> "3 2"), ``joint_beeps_motion`` (audio + video: "beeps and motion ?" -> "3 left") and
``joint_circles_motion`` (image + video: "circles and motion ?" -> "2 left"). At test time both modalities come
through their encoders, a combination no model was trained on: a single expert's LLM reads the other
modality's features poorly, a merged LLM carries both experts' adaptations.

Evaluation uses a **composite model** that routes each input to its encoder: the prompt's ``<audio>``,
``<image>`` and ``<video>`` placeholders are replaced by the features of the audio, vision and video
encoder+projector (each taken from its own checkpoint), and one LLM runs on the result (exactly what each
architecture's own forward does for its modality; a test checks the logits agree). The LLM is the base's,
one expert's (the "single-modality expert" rows: the expert's LLM with every encoder), or a merged one
(``omnimerge.merge`` with ``mode: modality``: one checkpoint per architecture, all carrying the merged LLM).
The **online composition** row is NaiveMC's "all adapters at once", ``W0 + sum_i dW_i`` (our experts are full
fine-tunes, so this is its dense form: task arithmetic with lambda = 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<audio>", "<video>")
PAD, UNK, BOS, EOS, IMAGE, AUDIO, VIDEO = range(7)
MODALITIES = ("audio", "vision", "video")
PLACEHOLDER = {"audio": AUDIO, "vision": IMAGE, "video": VIDEO}
N_TOKENS = {"audio": 25, "vision": 16, "video": 16}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 100, 245), "yellow": (235, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
#: task -> (modalities it needs, question)
TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "audio_count": (("audio",), "how many beeps ?"),
    "audio_pitch": (("audio",), "rising or falling ?"),
    "vision_count": (("vision",), "how many circles ?"),
    "vision_color": (("vision",), "what color are the circles ?"),
    "video_motion": (("video",), "which way does it move ?"),
    "video_appear": (("video",), "what appears ?"),
    "joint_count": (("audio", "vision"), "beeps and circles ?"),
    "joint_beeps_motion": (("audio", "video"), "beeps and motion ?"),
    "joint_circles_motion": (("vision", "video"), "circles and motion ?"),
}
SINGLE = {m: [t for t, (ms, _) in TASKS.items() if ms == (m,)] for m in MODALITIES}
JOINT = [t for t, (ms, _) in TASKS.items() if len(ms) > 1]
COLUMNS = ("audio", "vision", "video", "joint")
ANSWER_TOKENS = 2


def vocabulary() -> list[str]:
    words: list[str] = []
    for text in [q for _, q in TASKS.values()] + ["beeps circles moves rising falling yes no 1 2 3 4"]:
        for w in text.split():
            if w not in words:
                words.append(w)
    for w in (*COLORS, *SHAPES, *DIRECTIONS):
        if w not in words:
            words.append(w)
    return list(SPECIAL) + words


VOCAB = {w: i for i, w in enumerate(vocabulary())}
INV = {i: w for w, i in VOCAB.items()}


# --- scenes and rendering ------------------------------------------------------------------------------------------
@dataclass
class Scene:
    beeps: int
    rising: bool
    circles: int
    color: str
    direction: str
    shape: str
    seed: int

    def answer(self, task: str) -> str:
        pitch = "rising" if self.rising else "falling"
        return {
            "audio_count": str(self.beeps), "audio_pitch": pitch,
            "vision_count": str(self.circles), "vision_color": self.color,
            "video_motion": self.direction, "video_appear": self.shape,
            "joint_count": f"{self.beeps} {self.circles}",
            "joint_beeps_motion": f"{self.beeps} {self.direction}",
            "joint_circles_motion": f"{self.circles} {self.direction}",
        }[task]

    def describe(self, modality: str) -> str:
        """The scene's part for one modality in words (what the base LLM is pre-trained on)."""
        if modality == "audio":
            return f"beeps {self.beeps} {'rising' if self.rising else 'falling'}"
        if modality == "vision":
            return f"circles {self.circles} {self.color}"
        return f"{self.shape} moves {self.direction}"


def sample_scene(rng: np.random.Generator) -> Scene:
    beeps = int(rng.integers(1, 5))
    circles = int(rng.integers(1, 5))
    return Scene(beeps, bool(rng.integers(2)), circles, str(rng.choice(list(COLORS))),
                 str(rng.choice(DIRECTIONS)), str(rng.choice(SHAPES)), int(rng.integers(1 << 30)))


def render_audio(s: Scene) -> np.ndarray:
    """A 1-s clip at 1.6 kHz with ``beeps`` chirps (rising or falling), as a (16, 100) log spectrogram."""
    rng = np.random.default_rng(s.seed)
    sr, n = 1600, 1600
    wave = 0.05 * rng.standard_normal(n)
    slots = np.sort(rng.choice(4, size=s.beeps, replace=False))
    for k in slots:
        start = int(k * 400 + rng.integers(20, 120))
        length = int(rng.integers(180, 240))
        f0 = float(rng.uniform(200, 350))
        f1 = f0 + float(rng.uniform(250, 400))
        fa, fb = (f0, f1) if s.rising else (f1, f0)
        t = np.arange(length) / sr
        freq = fa + (fb - fa) * t / t[-1]
        phase = 2 * np.pi * np.cumsum(freq) / sr
        wave[start:start + length] += np.sin(phase) * np.hanning(length)
    frames = np.stack([wave[i * 16:i * 16 + 32] if i * 16 + 32 <= n else np.pad(wave[i * 16:], (0, 32 - (n - i * 16)))
                       for i in range(100)])
    spec = np.abs(np.fft.rfft(frames * np.hanning(32), axis=1))[:, 1:17]
    logspec = np.log1p(10 * spec).T.astype(np.float32)
    return (logspec - logspec.mean()) / (logspec.std() + 1e-6)


def _draw(d: Any, shape: str, cx: float, cy: float, r: float, color: tuple[int, int, int]) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def _pixels(img: Any) -> np.ndarray:
    return (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def render_image(s: Scene) -> np.ndarray:
    """32 x 32: ``circles`` circles of one colour in cells of a 2 x 2 grid (and maybe a distractor square)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(s.seed + 1)
    img = Image.new("RGB", (32, 32))
    d = ImageDraw.Draw(img)
    cells = rng.permutation(4)
    for c in cells[: s.circles]:
        _draw(d, "circle", 8 + 16 * (c % 2) + int(rng.integers(-1, 2)), 8 + 16 * (c // 2) + int(rng.integers(-1, 2)),
              5, COLORS[s.color])
    if s.circles < 4 and rng.integers(2):
        c = cells[s.circles]
        other = [k for k in COLORS if k != s.color][int(rng.integers(3))]
        _draw(d, "square", 8 + 16 * (c % 2), 8 + 16 * (c // 2), 4, COLORS[other])
    return _pixels(img)


def render_video(s: Scene) -> np.ndarray:
    """4 frames of 32 x 32: frame 0 is empty, then ``shape`` appears and moves 6 px per frame."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(s.seed + 2)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[s.direction]
    x0 = 16 - 6 * dx + int(rng.integers(-2, 3)) * (dx == 0)
    y0 = 16 - 6 * dy + int(rng.integers(-2, 3)) * (dy == 0)
    color = tuple(int(v) for v in rng.integers(150, 256, size=3))
    frames = []
    for f in range(4):
        img = Image.new("RGB", (32, 32))
        if f:
            _draw(ImageDraw.Draw(img), s.shape, x0 + 6 * dx * (f - 1), y0 + 6 * dy * (f - 1), 5, color)  # type: ignore[arg-type]
        frames.append(_pixels(img))
    return np.stack(frames)


RENDER = {"audio": render_audio, "vision": render_image, "video": render_video}
_SPLIT_SEED = {"train": 11, "validation": 12, "test": 13}


def make_examples(task: str, split: str, n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng([seed, list(TASKS).index(task), _SPLIT_SEED[split]])
    return [sample_scene(rng) for _ in range(n)]


# --- encoding ---------------------------------------------------------------------------------------------------
def words(text: str) -> list[int]:
    return [VOCAB.get(w, UNK) for w in text.split()]


def prompt_ids(task: str, scene: Scene, text_mods: Sequence[str] = (), extra: Sequence[str] = ()) -> list[int]:
    """``<s>`` + per modality (audio, vision, video order) its placeholders, or its description in words when
    it is in ``text_mods`` + the question. ``extra`` adds descriptions of other modalities (distractors)."""
    mods, question = TASKS[task]
    ids = [BOS]
    for m in MODALITIES:
        if m in extra or (m in mods and m in text_mods):
            ids += words(scene.describe(m))
        elif m in mods:
            ids += [PLACEHOLDER[m]] * N_TOKENS[m]
    return ids + words(question)


@dataclass
class Batch:
    ids: Any
    mask: Any
    labels: Any | None
    inputs: dict[str, Any]


def make_batch(task: str, scenes: Sequence[Scene], with_answers: bool, text_mods: Sequence[str] = (),
               extras: Sequence[Sequence[str]] | None = None) -> Batch:
    """Left-padded prompts (+ answers and ``</s>`` when training) and the rendered modality inputs."""
    import torch

    prompts = [prompt_ids(task, s, text_mods, extras[i] if extras else ()) for i, s in enumerate(scenes)]
    answers = [words(s.answer(task)) + [EOS] for s in scenes] if with_answers else [[] for _ in scenes]
    width = max(len(p) for p in prompts) + max(len(a) for a in answers)
    ids = np.full((len(scenes), width), PAD, dtype=np.int64)
    labels = np.full((len(scenes), width), -100, dtype=np.int64)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        seq = p + a
        off = width - len(seq) if not with_answers else max(len(q) for q in prompts) - len(p)
        ids[i, off:off + len(seq)] = seq
        labels[i, off + len(p):off + len(seq)] = a
    inputs = {}
    for m in TASKS[task][0]:
        if m not in text_mods:
            inputs[m] = torch.from_numpy(np.stack([RENDER[m](s) for s in scenes]))
    ids_t = torch.from_numpy(ids)
    return Batch(ids_t, (ids_t != PAD).long(), torch.from_numpy(labels) if with_answers else None, inputs)


# --- models -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteSpec:
    """Sizes and training of the modality zoo (hashed into its cache key)."""

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    mlp: int = 192
    #: trained to convergence on every seed (at 600 / 300 steps the base's loss stayed at 0.1-0.5 on some seeds
    #: and a video expert reached 66 % on its own tasks; docs/modality.md, "Robustness over seeds")
    base_steps: int = 1000
    base_lr: float = 3e-3
    expert_steps: int = 900
    #: the experts learn their modality in the LLM (encoder/projector lr 10x below the LLM's): when the new
    #: encoder and projector learned fast (lr 1e-3, or 3e-4), they mapped into the words the base already
    #: knew, the base and every single expert read a foreign encoder nearly as well as its own expert did,
    #: and whether a merge beat the best single expert on the joint tasks depended on the seed
    #: (docs/modality.md, "Robustness over seeds")
    expert_lr: float = 1e-4  # encoder and projector
    expert_llm_lr: float = 1e-3  # the LLM
    batch: int = 32
    #: experts also train on the joint questions, their own modality as input and the other one in words
    expert_joint: bool = True
    n_val: int = 100
    n_test: int = 300
    quick: bool = False

    @staticmethod
    def quick_spec(seed: int = 0) -> SuiteSpec:
        return SuiteSpec(seed=seed, base_steps=30, expert_steps=10, n_val=16, n_test=24, quick=True)

    def key(self) -> str:
        blob = json.dumps({"version": 2, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def text_config(spec: SuiteSpec) -> Any:
    import transformers as T

    return T.Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=spec.hidden, intermediate_size=spec.mlp, num_hidden_layers=spec.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )


def build(kind: str, spec: SuiteSpec, seed: int) -> Any:
    """A freshly initialised model: ``base`` (Qwen2 LM) or a modality expert architecture on the same LLM."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    text = text_config(spec)
    clip = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    if kind == "base":
        return T.Qwen2ForCausalLM(text)
    if kind == "vision":
        cfg: Any = T.LlavaConfig(vision_config=clip, text_config=text, image_token_index=IMAGE, image_seq_length=16,
                                 vision_feature_layer=-1, vision_feature_select_strategy="default", pad_token_id=PAD)
        return T.LlavaForConditionalGeneration(cfg)
    if kind == "audio":
        cfg = T.Qwen2AudioConfig(audio_config=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=4,
                                                   encoder_ffn_dim=128, d_model=64, max_source_positions=50),
                                 text_config=text.to_dict(), audio_token_index=AUDIO)
        return T.Qwen2AudioForConditionalGeneration(cfg)
    if kind == "video":
        cfg = T.LlavaNextVideoConfig(vision_config=clip, text_config=text, video_token_index=VIDEO,
                                     image_token_index=IMAGE, image_grid_pinpoints=[[32, 32]],
                                     vision_feature_layer=-1, vision_feature_select_strategy="default",
                                     spatial_pool_stride=2, pad_token_id=PAD)
        return T.LlavaNextVideoForConditionalGeneration(cfg)
    raise ValueError(kind)


MODEL_CLASS = {"vision": "LlavaForConditionalGeneration", "audio": "Qwen2AudioForConditionalGeneration",
               "video": "LlavaNextVideoForConditionalGeneration", "base": "Qwen2ForCausalLM"}


MODEL_TYPE = {"vision": "llava", "audio": "qwen2_audio", "video": "llava_next_video", "base": "qwen2"}


def load(kind: str, path: str | Path) -> Any:
    import transformers as T

    from omnimerge.examples import quiet_transformers

    quiet_transformers()

    return getattr(T, MODEL_CLASS[kind]).from_pretrained(path, trust_remote_code=False).eval()


def llm_of(model: Any) -> tuple[Any, Any]:
    """(decoder, lm_head) of a causal LM or of a multimodal model's language model."""
    inner = model.model
    return (inner.language_model if hasattr(inner, "language_model") else inner), model.lm_head


def encode(modality: str, model: Any, x: Any) -> Any:
    """The modality's features as the architecture computes them (encoder + projector), one row per token."""
    if modality == "vision":
        out = model.model.get_image_features(pixel_values=x, vision_feature_layer=-1,
                                             vision_feature_select_strategy="default").pooler_output
    elif modality == "video":
        out = model.model.get_video_features(pixel_values_videos=x, vision_feature_layer=-1,
                                             vision_feature_select_strategy="default").pooler_output
    else:
        out = model.model.multi_modal_projector(model.model.audio_tower(x).last_hidden_state)
    import torch

    if isinstance(out, list | tuple):
        out = torch.cat(list(out))
    return out.reshape(-1, out.shape[-1])


class Composite:
    """One LLM, each modality's placeholders replaced by its own encoder's features (routing by token)."""

    def __init__(self, llm_model: Any, encoders: dict[str, Any]) -> None:
        self.decoder, self.head = llm_of(llm_model)
        self.encoders = encoders

    def logits(self, ids: Any, mask: Any, inputs: dict[str, Any]) -> Any:
        emb = self.decoder.embed_tokens(ids)
        for m, x in inputs.items():
            feats = encode(m, self.encoders[m], x).to(emb.dtype)
            sel = (ids == PLACEHOLDER[m]).unsqueeze(-1).expand_as(emb)
            emb = emb.masked_scatter(sel, feats)
        h = self.decoder(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        return self.head(h)


def _loss(logits: Any, labels: Any) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def _train(params: list[tuple[list[Any], float]], steps: int, step_fn: Callable[[int], Any]) -> list[float]:
    import torch

    opt = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in params], weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(1, steps)))
    losses = []
    for s in range(steps):
        loss = step_fn(s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for p, _ in params for q in p], 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def train_base(spec: SuiteSpec) -> tuple[Any, list[float]]:
    """Text-only pre-training on every task's question over word descriptions (distractors included)."""
    model = build("base", spec, spec.seed)
    model.train()
    rng = np.random.default_rng([spec.seed, 99])
    tasks = list(TASKS)

    def step(s: int) -> Any:
        task = tasks[s % len(tasks)]
        scenes = [sample_scene(rng) for _ in range(spec.batch)]
        extras = [[m for m in MODALITIES if m not in TASKS[task][0] and rng.random() < 0.3] for _ in scenes]
        b = make_batch(task, scenes, True, text_mods=MODALITIES, extras=extras)
        return _loss(model(input_ids=b.ids, attention_mask=b.mask).logits, b.labels)

    losses = _train([(list(model.parameters()), spec.base_lr)], spec.base_steps, step)
    return model.eval(), losses


def train_expert(modality: str, base: Any, spec: SuiteSpec) -> tuple[Any, list[float]]:
    """The modality's architecture with the base's LLM copied in; LLM + new encoder/projector trained on the
    modality's two tasks."""
    import torch

    model = build(modality, spec, spec.seed + 1 + MODALITIES.index(modality))
    decoder, head = llm_of(model)
    with torch.no_grad():
        decoder.load_state_dict(base.model.state_dict())
        head.load_state_dict(base.lm_head.state_dict())
    model.train()
    comp = Composite(model, {modality: model})
    llm_params = list(decoder.parameters()) + list(head.parameters())
    ids = {id(p) for p in llm_params}
    own = [p for p in model.parameters() if id(p) not in ids]
    rng = np.random.default_rng([spec.seed, 100 + MODALITIES.index(modality)])
    joint = [t for t in JOINT if modality in TASKS[t][0]] if spec.expert_joint else []
    tasks = SINGLE[modality] + joint

    def step(s: int) -> Any:
        task = tasks[s % len(tasks)]
        scenes = [sample_scene(rng) for _ in range(spec.batch)]
        others = [m for m in TASKS[task][0] if m != modality]  # a joint task: the other modality in words
        b = make_batch(task, scenes, True, text_mods=others)
        return _loss(comp.logits(b.ids, b.mask, b.inputs), b.labels)

    losses = _train([(own, spec.expert_lr), (llm_params, spec.expert_llm_lr)], spec.expert_steps, step)
    return model.eval(), losses


# --- evaluation ----------------------------------------------------------------------------------------------------
def evaluate(comp: Composite, suite: dict[str, tuple[list[Scene], Batch]]) -> dict[str, dict[str, float]]:
    """Greedy decoding (special tokens banned) of every task; exact match; binomial standard errors."""
    import torch

    res = {}
    with torch.inference_mode():
        for task, (scenes, b) in suite.items():
            ids, mask = b.ids, b.mask
            gen = []
            for _ in range(ANSWER_TOKENS):
                logits = comp.logits(ids, mask, b.inputs)[:, -1].float()
                logits[:, [PAD, UNK, BOS, IMAGE, AUDIO, VIDEO]] = -float("inf")
                nxt = logits.argmax(-1)
                gen.append(nxt)
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
            out = torch.stack(gen, 1).tolist()
            preds = [" ".join(INV[i] for i in _until_eos(o)) for o in out]
            acc = float(np.mean([p == s.answer(task) for p, s in zip(preds, scenes, strict=True)]))
            res[task] = {"score": acc, "se": float(np.sqrt(max(acc * (1 - acc), 1e-12) / len(scenes))),
                         "n": len(scenes)}
    return res


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids


def build_suite(split: str, n: int, seed: int) -> dict[str, tuple[list[Scene], Batch]]:
    out = {}
    for task in TASKS:
        scenes = make_examples(task, split, n, seed)
        out[task] = (scenes, make_batch(task, scenes, with_answers=False))
    return out


def summarise(res: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per column (audio, vision, video tasks; joint tasks): mean score and its standard error."""
    cols = {m: SINGLE[m] for m in MODALITIES} | {"joint": JOINT}
    out = {}
    for c, tasks in cols.items():
        out[c] = {"score": float(np.mean([res[t]["score"] for t in tasks])),
                  "se": float(np.sqrt(sum(res[t]["se"] ** 2 for t in tasks)) / len(tasks))}
    return out


# --- the zoo ---------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    env = os.environ.get("OMNIMERGE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "omnimerge") / "modality-zoo"


@dataclass
class ModalityZoo:
    spec: SuiteSpec
    root: Path
    info: dict[str, Any] = field(default_factory=dict)

    def dir(self, kind: str) -> Path:
        return self.root / kind


def build_zoo(spec: SuiteSpec, root: str | Path | None = None, rebuild: bool = False,
              log: Callable[[str], None] = print) -> ModalityZoo:
    """Train (or reuse) the base and the three modality experts; save them with ``save_pretrained``."""
    import torch

    from omnimerge.examples import quiet_transformers

    quiet_transformers()
    root = Path(root) if root else cache_root() / spec.key()
    zoo = ModalityZoo(spec, root)
    if (root / "zoo.json").is_file() and not rebuild:
        zoo.info = json.loads((root / "zoo.json").read_text())
        log(f"modality zoo: reusing {root}")
        return zoo
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base, base_losses = train_base(spec)
    base.save_pretrained(zoo.dir("base"))
    timings["base"] = time.perf_counter() - t0
    log(f"modality zoo: base LLM trained in {timings['base']:.0f} s (loss {base_losses[-1]:.3f})")
    losses = {"base": base_losses[-1]}
    for m in MODALITIES:
        t0 = time.perf_counter()
        model, ls = train_expert(m, base, spec)
        model.save_pretrained(zoo.dir(m))
        timings[m] = time.perf_counter() - t0
        losses[m] = ls[-1]
        log(f"modality zoo: {m} expert trained in {timings[m]:.0f} s (loss {ls[-1]:.3f})")
    zoo.info = {"spec": asdict(spec), "key": spec.key(), "timings": timings, "final_loss": losses}
    (root / "zoo.json").write_text(json.dumps(zoo.info, indent=1))
    return zoo


# --- the bench ---------------------------------------------------------------------------------------------------
def _llm_state(model: Any) -> dict[str, Any]:
    """The LLM's tensors of a model, under the Qwen2ForCausalLM names."""
    decoder, head = llm_of(model)
    sd = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    sd.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    return sd


def run_modality_bench(
    out: str | Path = "bench-results/modality",
    methods: Sequence[str] | None = None,
    quick: bool = False,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
    zoo_root: str | Path | None = None,
    lambdas: Sequence[float] = (0.3, 0.5, 0.7, 1.0),
    seed: int = 0,
) -> dict[str, Any]:
    """Build/reuse the modality zoo, merge the three experts' LLMs with every method (``mode: modality``),
    evaluate the composite models; write results.json / results.csv / results.md / modality.png into ``out``."""
    import torch

    import omnimerge
    from omnimerge.bench.merging import has_scaling
    from omnimerge.methods import get_method, registry

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = replace(SuiteSpec.quick_spec() if quick else SuiteSpec(), seed=seed)
    zoo = build_zoo(spec, zoo_root, rebuild, log)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    val = build_suite("validation", spec.n_val, spec.seed)
    test = build_suite("test", spec.n_test, spec.seed)
    experts = {m: load(m, zoo.dir(m)) for m in MODALITIES}
    base = load("base", zoo.dir("base"))
    w0 = _llm_state(base)
    rows: list[dict[str, Any]] = []

    def add_row(name: str, kind: str, llm: Any, encoders: dict[str, Any], extra: dict[str, Any]) -> None:
        res = evaluate(Composite(llm, encoders), test)
        rows.append({"name": name, "kind": kind, "tasks": res, "columns": summarise(res), **extra})
        c = rows[-1]["columns"]
        log(f"  {name:<28} " + "  ".join(f"{k} {100 * v['score']:5.1f}" for k, v in c.items()))

    log("reference models (composite: the row's LLM + every expert's own encoder and projector)")
    add_row("base", "reference", base, experts, {})
    for m in MODALITIES:
        add_row(f"{m} expert", "expert", experts[m], experts, {})
    best = {c: max(r["columns"][c]["score"] for r in rows if r["kind"] == "expert") for c in COLUMNS}

    not_run: dict[str, str] = {}
    if methods:
        names = list(methods)
    else:  # every dense method that merges these experts with its default parameters; the others: said why
        names = []
        for n, m in sorted(registry().items()):
            if getattr(m, "output_kind", "dense") != "dense":
                continue
            why = m.refusal(len(MODALITIES))
            if why is None:
                names.append(n)
            else:
                not_run[n] = why
                log(f"  not run: {n} ({why})")
    scratch = out / ".merges"
    llm_holder = load("base", zoo.dir("base"))

    def with_llm(state: dict[str, Any]) -> Any:
        llm_holder.load_state_dict(state)
        return llm_holder

    recipe_models = [{"model": str(zoo.dir(m)), "name": m} for m in MODALITIES]
    todo = [("online composition (NaiveMC)", "task_arithmetic", {"scaling": 1.0}, False)]
    todo += [(n, n, {"scaling": 1.0} if has_scaling(get_method(n)) else {}, has_scaling(get_method(n)))
             for n in names]
    log("merges (mode: modality; lambda chosen on the validation split, mean of all columns)")
    for label, method, params, grid in todo:
        t0 = time.perf_counter()
        dest = scratch / label.split()[0]
        try:
            rep = omnimerge.merge({"mode": "modality", "base_model": str(zoo.dir("base")), "models": recipe_models,
                                   "merge_method": method, "parameters": params}, dest, overwrite=True,
                                  hash_inputs=False)
        except Exception as exc:  # noqa: BLE001 - one failing method must not stop the bench
            log(f"  {label}: failed ({exc})")
            rows.append({"name": label, "kind": "method", "error": str(exc)})
            continue
        merge_s = time.perf_counter() - t0
        outs = {m: load(m, dest / rep.outputs[MODEL_TYPE[m]]["path"]) for m in MODALITIES}
        w1 = _llm_state(outs["vision"])
        lam_scores = {}
        chosen = 1.0
        if grid:
            for lam in lambdas:
                st = {k: w0[k] + lam * (w1[k] - w0[k]) for k in w0}
                r = summarise(evaluate(Composite(with_llm(st), outs), val))
                lam_scores[lam] = float(np.mean([v["score"] for v in r.values()]))
            chosen = max(lam_scores, key=lambda k: lam_scores[k])
        st = {k: w0[k] + chosen * (w1[k] - w0[k]) for k in w0}
        kind = "online" if label.startswith("online") else "method"
        add_row(label, kind, with_llm(st), outs, {"method": method, "lambda": chosen if grid else None,
                                                    "lambda_val": lam_scores, "merge_seconds": merge_s})
    shutil.rmtree(scratch, ignore_errors=True)
    results = {
        "suite": "modality", "spec": asdict(spec), "zoo": str(zoo.root), "zoo_info": zoo.info,
        "best_single": best, "rows": rows, "methods_not_run": not_run, "seconds": time.perf_counter() - t_start,
        "tasks": {t: {"modalities": list(ms), "question": q} for t, (ms, q) in TASKS.items()},
    }
    write_reports(results, out)
    return results


# --- reports -----------------------------------------------------------------------------------------------------
TITLES = {"audio": "Audio", "vision": "Vision", "video": "Video", "joint": "Joint (2 modalities)"}


def markdown(results: dict[str, Any]) -> str:
    best = results["best_single"]
    head = "| model | " + " | ".join(TITLES[c] for c in COLUMNS) + " | joint − best single | λ |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    lines.append("| best single-modality expert | " + " | ".join(f"{100 * best[c]:.1f}" for c in COLUMNS)
                 + " | | |")
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:60]} |" + " |" * (len(COLUMNS) + 1))
            continue
        c = r["columns"]
        cells = [f"{100 * c[k]['score']:.1f} ± {100 * c[k]['se']:.1f}" for k in COLUMNS]
        gain = 100 * (c["joint"]["score"] - best["joint"])
        lam = r.get("lambda")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {gain:+.1f} | {'' if lam is None else lam} |")
    per_task = ["", "Per task (test accuracy, %):", "",
                "| model | " + " | ".join(TASKS) + " |", "|" + "---|" * (len(TASKS) + 1)]
    for r in results["rows"]:
        if "error" not in r:
            per_task.append(f"| {r['name']} | " + " | ".join(f"{100 * r['tasks'][t]['score']:.1f}" for t in TASKS)
                            + " |")
    not_run = results.get("methods_not_run") or {}
    if not_run:
        per_task += ["", "Not run (they cannot merge these experts with their default parameters): "
                     + "; ".join(f"{k}: {v}" for k, v in not_run.items())]
    return "\n".join(lines + per_task) + "\n"


def write_reports(results: dict[str, Any], out: Path) -> list[Path]:
    import csv

    paths = [out / "results.json", out / "results.csv", out / "results.md", out / "modality.png"]
    paths[0].write_text(json.dumps(results, indent=1))
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "kind", "lambda", *[f"{c}_score" for c in COLUMNS], *TASKS])
        for r in results["rows"]:
            if "error" in r:
                continue
            w.writerow([r["name"], r["kind"], r.get("lambda"), *[f"{r['columns'][c]['score']:.4f}" for c in COLUMNS],
                        *[f"{r['tasks'][t]['score']:.4f}" for t in TASKS]])
    n = results["spec"]["n_test"]
    paths[2].write_text(f"# Modality suite (test split, {n} examples per task, accuracy % ± s.e.)\n\n"
                        + markdown(results) + f"\nTotal time: {results['seconds']:.0f} s.\n")
    try:
        _plot(results, paths[3])
    except Exception:  # noqa: BLE001 - plotting is optional (no matplotlib)
        paths.pop()
    return paths


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4))
    width = 0.8 / len(COLUMNS)
    x = np.arange(len(rows))
    for i, c in enumerate(COLUMNS):
        ax.bar(x + i * width, [100 * r["columns"][c]["score"] for r in rows], width, label=TITLES[c],
               yerr=[100 * r["columns"][c]["se"] for r in rows], capsize=2)
    ax.axhline(100 * results["best_single"]["joint"], color="k", ls="--", lw=1, label="best single expert, joint")
    ax.set_xticks(x + width * (len(COLUMNS) - 1) / 2, [r["name"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("modality suite: per modality and joint tasks")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
