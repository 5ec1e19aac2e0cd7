"""Every task of the pool on fixtures in the exact hub format, read from save_to_disk, parquet and JSONL; the
prompts; scores of hand-made predictions worked out by hand; sampling; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value

from omnimerge.errors import OmniMergeError
from omnimerge.eval import get_task, task_names
from omnimerge.eval.data import DataError, stratified_sample
from omnimerge.eval.protocol import Generation
from tests import eval_fixtures as F

POOL = ["vqav2", "gqa", "vizwiz", "mathvista", "mathvision", "geometry3k", "chartqa", "textvqa", "ocrvqa",
        "ocrbench", "docvqa", "refcoco", "refcoco_plus", "refcocog"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Each task's fixture saved three ways: save_to_disk (a DatasetDict), a parquet file, a JSONL."""
    root = tmp_path_factory.mktemp("evaldata")
    out: dict[str, dict[str, Path]] = {}
    for name in POOL:
        task = get_task(name)
        ds = F.dataset(name)
        out[name] = {
            "disk": F.save_disk(ds, root / name / "disk", task.split),
            "parquet": F.save_parquet(ds, root / name / f"{task.split}.parquet"),
            "jsonl": F.save_jsonl(F.rows(name), root / name / "jsonl" / "data.jsonl"),
        }
    F.save_disk(F.gqa_images(), root / "gqa_images", "testdev")
    out["gqa_images"] = {"disk": root / "gqa_images"}
    return out


def load(layouts: dict[str, dict[str, Path]], name: str, kind: str = "disk", **kw):  # type: ignore[no-untyped-def]
    if name == "gqa":
        kw.setdefault("image_source", layouts["gqa_images"]["disk"])
    return get_task(name).load(layouts[name][kind], **kw)


def scores(layouts: dict[str, dict[str, Path]], name: str, preds: list[str], box_format: str = "normalized",
           ) -> list[float]:
    data = load(layouts, name)
    task = data.task
    assert len(data.examples) == len(preds)
    return [task.score(ex, Generation(p, ex.image_sizes), box_format).value for ex, p in zip(data.examples, preds,
                                                                                             strict=True)]


def test_pool_names_and_capabilities() -> None:
    assert sorted(task_names()) == sorted(POOL)
    caps = {n: get_task(n).capability for n in POOL}
    assert caps["vizwiz"] == caps["gqa"] == caps["vqav2"] == "VQA"
    assert caps["mathvista"] == caps["mathvision"] == caps["geometry3k"] == "Geometry"
    assert caps["chartqa"] == "Chart" and caps["docvqa"] == caps["ocrbench"] == "OCR"
    assert caps["refcoco_plus"] == "Grounding"
    assert get_task("RefCOCO+").name == "refcoco_plus"


@pytest.mark.parametrize("name", POOL)
def test_three_layouts_give_the_same_examples(layouts: dict[str, dict[str, Path]], name: str) -> None:
    loaded = [load(layouts, name, kind) for kind in ("disk", "parquet", "jsonl")]
    first = loaded[0]
    assert first.n_rows == len(F.rows(name)) and first.skipped == 0
    for other in loaded[1:]:
        assert [(e.doc_id, e.sub, e.question, e.references, e.groups, e.image_sizes) for e in other.examples] == [
            (e.doc_id, e.sub, e.question, e.references, e.groups, e.image_sizes) for e in first.examples]
    for data in loaded:   # no image bytes held: read again from the dataset (or the file) when requested
        assert all(ref.data is None for e in data.examples for ref in e.images)
    task = first.task
    req = task.request(first.examples[0])
    assert len(req.images) == 1 and req.images[0].mode == "RGB"
    assert req.images[0].size == first.examples[0].image_sizes[0]
    assert req.max_new_tokens == task.max_new_tokens and req.prompt


def test_a_saved_dataset_is_its_split(layouts: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    F.dataset("chartqa").save_to_disk(str(tmp_path / "one"))
    data = get_task("chartqa").load(tmp_path / "one", split="whatever")
    assert data.n_rows == 4


def test_parquet_folder_in_hub_layout(tmp_path: Path) -> None:
    F.save_parquet(F.dataset("chartqa"), tmp_path / "data" / "test-00000-of-00001.parquet")
    F.save_parquet(F.dataset("chartqa").select([0]), tmp_path / "data" / "val-00000-of-00001.parquet")
    assert get_task("chartqa").load(tmp_path).n_rows == 4
    assert get_task("chartqa").load(tmp_path, split="val").n_rows == 1


# --- VQA -------------------------------------------------------------------------------------------------------

def test_vqav2(layouts: dict[str, dict[str, Path]]) -> None:
    # row 0: 6 red, 2 dark red, maroon, Red -> "dark red" 0.6; row 1: "3" 0.9 (see test_eval_metrics); row 2: 1
    assert scores(layouts, "vqav2", ["dark red", "3", "Yes"]) == pytest.approx([0.6, 0.9, 1.0])
    ex = load(layouts, "vqav2").examples[1]
    assert get_task("vqav2").prompt(ex) == "How many dogs are there?\nAnswer the question using a single word or phrase."
    assert ex.groups == ("number",) and ex.stratum == "how many"


def test_vizwiz(layouts: dict[str, dict[str, Path]]) -> None:
    # row 0: 7 x unanswerable -> 1; row 1: "navy" once among 10 -> 0.3
    assert scores(layouts, "vizwiz", ["Unanswerable", "navy"]) == pytest.approx([1.0, 0.3])
    ex = load(layouts, "vizwiz").examples[0]
    assert get_task("vizwiz").prompt(ex) == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.")


def test_gqa_joins_the_image_table(layouts: dict[str, dict[str, Path]]) -> None:
    data = load(layouts, "gqa")
    assert [e.image_sizes for e in data.examples] == [((40, 30),), ((30, 40),), ((40, 30),), ((30, 40),)]
    assert scores(layouts, "gqa", ["White.", "no", "Right", "the sunny"]) == [1.0, 0.0, 1.0, 0.0]
    assert data.examples[1].groups == ("verify",)
    with pytest.raises(DataError, match="no 'image' field"):
        get_task("gqa").load(layouts["gqa"]["disk"])


def test_gqa_with_an_image_column(tmp_path: Path) -> None:
    feats, rows = F.BUILDERS["gqa"]()
    feats = Features({**feats, "image": Image()})
    ds = Dataset.from_list([{**r, "image": F.png(12, 10)} for r in rows], features=feats)
    data = get_task("gqa").load(F.save_disk(ds, tmp_path / "g", "testdev"))
    assert data.examples[0].image_sizes == ((12, 10),)


# --- Geometry --------------------------------------------------------------------------------------------------

def _mathvista_example(layouts: dict[str, dict[str, Path]], i: int):  # type: ignore[no-untyped-def]
    return load(layouts, "mathvista").examples[i]


@pytest.mark.parametrize(("i", "pred", "want"), [
    (0, "D", 1.0), (0, "(D) 145°", 1.0), (0, "The answer is D.", 1.0), (0, "145°", 1.0),
    (0, "It is 145° clearly", 1.0),   # "45°" is inside "145°": the longer choice wins
    (0, "B", 0.0),
    (1, "12", 1.0), (1, "The length is 12 cm.", 1.0), (1, "12.0", 1.0), (1, "13", 0.0),
    (2, "0.35", 1.0), (2, "0.350", 1.0), (2, "0.3", 0.0),
    (3, "B", 1.0), (3, "g", 1.0),
    (4, "[1, 3]", 1.0), (4, "The intercepts are [1,3].", 1.0), (4, "[1, 4]", 0.0),
])
def test_mathvista_rule_based_extraction(layouts: dict[str, dict[str, Path]], i: int, pred: str,
                                         want: float) -> None:
    ex = _mathvista_example(layouts, i)
    assert get_task("mathvista").score(ex, pred).value == want


@pytest.mark.parametrize(("i", "pred"), [(0, "a triangle"), (1, "no idea"), (0, ""), (4, "none")])
def test_mathvista_unparsed(layouts: dict[str, dict[str, Path]], i: int, pred: str) -> None:
    sc = get_task("mathvista").score(_mathvista_example(layouts, i), pred)
    assert sc.value == 0.0 and not sc.parsed


def test_mathvista_prompts(layouts: dict[str, dict[str, Path]]) -> None:
    t = get_task("mathvista")
    assert t.prompt(_mathvista_example(layouts, 0)) == (
        "Find the measure of angle 1.\nA. 30°\nB. 45°\nC. 60°\nD. 145°\n"
        "Answer with the option's letter from the given choices directly.")
    assert t.prompt(_mathvista_example(layouts, 1)) == (
        "What is the length of AB? (Unit: cm)\nAnswer the question using a single integer number.")
    assert t.prompt(_mathvista_example(layouts, 2)) == (
        "What fraction of the bar is shaded?\n"
        "Answer the question using a single floating-point number with two decimal places.")


def test_mathvista_optional_judge(layouts: dict[str, dict[str, Path]]) -> None:
    from omnimerge.eval.tasks.math import MathVista

    ex = _mathvista_example(layouts, 0)
    rambling = "Angles on a line add up to 180, so the angle is one hundred forty-five degrees"
    assert MathVista().score(ex, rambling).parsed is False
    calls = []

    def judge(prompt: str, response: str) -> str:
        calls.append((prompt, response))
        return "D"

    assert MathVista(judge=judge).score(ex, rambling).value == 1.0
    assert calls and calls[0][1] == rambling


def test_mathvista_paper_subsets(layouts: dict[str, dict[str, Path]]) -> None:
    from omnimerge.eval.results import Scored, task_result

    data = load(layouts, "mathvista")
    task = data.task
    preds = ["D", "13", "0.35", "A", "[1, 3]"]  # right, wrong, right, wrong, right
    scored = [Scored(e, task.prompt(e), p, task.score(e, p)) for e, p in zip(data.examples, preds, strict=True)]
    entry = task_result(data, scored)
    assert entry["value"] == pytest.approx(0.6)
    # geometry reasoning: rows 0, 1 -> 1/2; algebraic reasoning: rows 0, 3, 4 -> 2/3; geometry problem
    # solving: rows 0, 1 -> 1/2; the paper's number is their mean
    assert entry["groups"]["skill:geometry reasoning"] == {"value": 0.5, "n": 2}
    assert entry["paper_value"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


@pytest.mark.parametrize(("i", "pred", "want"), [
    (0, "... so \\boxed{C}", 1.0), (0, "The answer is C.", 1.0), (0, "C", 1.0),
    (0, "\\boxed{30}", 1.0),          # the option's value
    (0, "\\boxed{B}", 0.0),
    (1, "area = 4^2 = \\boxed{16}", 1.0), (1, "\\boxed{\\frac{32}{2}}", 1.0), (1, "The answer is 16.0", 1.0),
    (1, "\\boxed{15}", 0.0),
    (2, "\\boxed{2.50}", 1.0), (2, "\\boxed{5/2}", 1.0),
])
def test_mathvision_scoring(layouts: dict[str, dict[str, Path]], i: int, pred: str, want: float) -> None:
    ex = load(layouts, "mathvision").examples[i]
    assert get_task("mathvision").score(ex, pred).value == want


def test_mathvision_prompt_and_paper_subsets(layouts: dict[str, dict[str, Path]]) -> None:
    from omnimerge.eval.results import Scored, task_result

    data = load(layouts, "mathvision")
    task = data.task
    assert task.prompt(data.examples[0]) == (
        'Please solve the problem step by step and put your answer in one "\\boxed{}".Which angle is the largest?'
        "\nChoices: A. 10\nB. 20\nC. 30\nD. 40\nE. 50\n"
        "Answer the question with the option's letter from the given choices directly.")
    preds = ["\\boxed{C}", "\\boxed{15}", "\\boxed{2.5}"]
    entry = task_result(data, [Scored(e, "", p, task.score(e, p)) for e, p in zip(data.examples, preds,
                                                                                   strict=True)])
    # subjects angle (right) and area (wrong) are geometry; "counting" (right) is not: paper 0.5, overall 2/3
    assert entry["value"] == pytest.approx(2 / 3) and entry["paper_value"] == pytest.approx(0.5)


@pytest.mark.parametrize(("i", "pred", "want", "parsed"), [
    (0, "C", 1.0, True), (0, "Answer: C", 1.0, True), (0, "The answer is (C).", 1.0, True),
    (0, "5", 1.0, True), (0, "B", 0.0, True), (0, "c", 1.0, True),   # a bare letter, any case
    (0, "I think it is a right angle, so C", 1.0, True), (0, "C is correct", 1.0, True),
    (0, "none of these", 0.0, False),
    (1, "B. 24", 1.0, True),
    (1, "a triangle with area 24", 1.0, True),   # the article "a" is not option A
])
def test_geometry3k(layouts: dict[str, dict[str, Path]], i: int, pred: str, want: float, parsed: bool) -> None:
    ex = load(layouts, "geometry3k").examples[i]
    sc = get_task("geometry3k").score(ex, pred)
    assert (sc.value, sc.parsed) == (want, parsed)
    if i == 0:
        assert get_task("geometry3k").prompt(ex) == (
            "Find x.\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer with the option's letter from the given choices directly.")


# --- Chart, OCR ------------------------------------------------------------------------------------------------

def test_chartqa(layouts: dict[str, dict[str, Path]]) -> None:
    # 45.9 vs 45: 2 %; 2018 vs 2019: 0.05 % (relaxed accuracy accepts it too); 30% = 0.3; Blue != Red
    assert scores(layouts, "chartqa", ["45.9", "2018", "30%", "Blue"]) == [1.0, 1.0, 1.0, 0.0]
    ex = load(layouts, "chartqa").examples[0]
    assert get_task("chartqa").prompt(ex) == "What is the share of Apple?\nAnswer the question with a single word."
    assert [e.groups for e in load(layouts, "chartqa").examples][2] == ("augmented_test",)


def test_textvqa(layouts: dict[str, dict[str, Path]]) -> None:
    # 5 x dakota -> 1; 3 x "dakota digital": own subsets 2/3, the other seven 1 -> 0.9
    assert scores(layouts, "textvqa", ["Dakota"]) == [1.0]
    ex = load(layouts, "textvqa").examples[0]
    assert get_task("textvqa").score(ex, "Dakota Digital").value == pytest.approx(0.9)
    assert get_task("textvqa").prompt(ex) == (
        "What is the brand of this camera?\nAnswer the question using a single word or phrase.")


def test_ocrvqa_one_example_per_question(layouts: dict[str, dict[str, Path]]) -> None:
    data = load(layouts, "ocrvqa")
    assert [(e.doc_id, e.sub) for e in data.examples] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert scores(layouts, "ocrvqa", ["Jane Austen.", "emma", "Yes", "travel"]) == [1.0, 1.0, 0.0, 1.0]


def test_ocrvqa_flat_table(tmp_path: Path) -> None:
    ds = Dataset.from_list([{"question": "Who wrote this book?", "answer": "Jane Austen", "image": F.png(8, 8)}],
                           features=Features({"question": Value("string"), "answer": Value("string"),
                                              "image": Image()}))
    data = get_task("ocrvqa").load(F.save_disk(ds, tmp_path / "o", "test"))
    assert [(e.doc_id, e.sub, e.references) for e in data.examples] == [(0, None, ("Jane Austen",))]


def test_ocrbench(layouts: dict[str, dict[str, Path]]) -> None:
    # containment after lower-casing; HME100k: whitespace removed; any reference may be contained
    assert scores(layouts, "ocrbench", ["The word is chair", "x^{2}+1", "It says May 1, 1990."]) == [1.0, 1.0, 1.0]
    data = load(layouts, "ocrbench")
    t = data.task
    assert t.score(data.examples[0], "ＣＨＡＩＲ").value == 1.0     # full-width letters folded
    assert t.score(data.examples[2], "1990").value == 0.0
    assert t.score(data.examples[1], "X^{2}+1").value == 0.0      # HME100k is case-sensitive
    assert t.prompt(data.examples[0]) == "what is written in the image?"


def test_docvqa(layouts: dict[str, dict[str, Path]]) -> None:
    assert scores(layouts, "docvqa", ["1/8/93", "Carter"]) == pytest.approx([1.0, 1 - 3 / 9])


# --- Grounding -------------------------------------------------------------------------------------------------

def test_refcoco_one_example_per_expression(layouts: dict[str, dict[str, Path]]) -> None:
    data = load(layouts, "refcoco")
    assert [(e.doc_id, e.sub, e.question) for e in data.examples] == [
        (0, 0, "man on left"), (0, 1, "guy in red"), (1, 0, "tree")]
    assert data.examples[0].references == ([20.0, 10.0, 100.0, 50.0],)


# the first row's image is 200 x 100 and its box [20, 10, 80, 40] (x, y, w, h): [0.1, 0.1, 0.5, 0.5] of the image
@pytest.mark.parametrize(("fmt", "text", "want"), [
    ("qwen2vl", "<|box_start|>(100,100),(500,500)<|box_end|>", 1.0),
    ("normalized", "<|box_start|>(100,100),(500,500)<|box_end|>", 0.0),   # read as normalised: no overlap
    ("internvl", "<ref>man on left</ref><box>[[100, 100, 500, 500]]</box>", 1.0),
    ("normalized", "[0.1, 0.1, 0.5, 0.5]", 1.0),
    ("normalized", "[0.1, 0.1, 0.4, 0.5]", 1.0),   # IoU 0.12 / 0.16 = 0.75
    ("normalized", "[0.1, 0.1, 0.31, 0.5]", 1.0),  # IoU 0.084 / 0.16 = 0.525
    ("normalized", "[0.1, 0.1, 0.29, 0.5]", 0.0),  # IoU 0.076 / 0.16 = 0.475
    # Qwen2.5-VL: pixels of the 196 x 112 resize (smart_resize of 200 x 100); [20/196, 11/112, 98/196, 56/112]
    ("qwen25vl", '{"bbox_2d": [20, 11, 98, 56], "label": "man"}', 1.0),
    ("qwen2vl", '{"bbox_2d": [20, 11, 98, 56], "label": "man"}', 0.0),
])
def test_refcoco_acc_at_05_per_box_convention(layouts: dict[str, dict[str, Path]], fmt: str, text: str,
                                              want: float) -> None:
    ex = load(layouts, "refcoco").examples[0]
    assert get_task("refcoco").score(ex, text, fmt).value == want


def test_qwen25vl_uses_the_generation_image_size(layouts: dict[str, dict[str, Path]]) -> None:
    ex = load(layouts, "refcoco").examples[0]
    t = get_task("refcoco")
    # the model saw the image at 392 x 224: the same pixels are a quarter of the box, the doubled ones are it
    assert t.score(ex, Generation('{"bbox_2d": [20, 11, 98, 56]}', ((392, 224),)), "qwen25vl").value == 0.0
    assert t.score(ex, Generation('{"bbox_2d": [39, 22, 196, 112]}', ((392, 224),)), "qwen25vl").value == 1.0


def test_refcoco_parse_failures_and_prompts(layouts: dict[str, dict[str, Path]]) -> None:
    from omnimerge.eval.results import Scored, task_result

    data = load(layouts, "refcoco")
    t = data.task
    preds = ["[0.1, 0.1, 0.5, 0.5]", "I cannot see it", "[0, 0, 0.5, 1]"]
    sc = [t.score(e, p) for e, p in zip(data.examples, preds, strict=True)]
    assert [(s.value, s.parsed) for s in sc] == [(1.0, True), (0.0, False), (1.0, True)]
    entry = task_result(data, [Scored(e, "", p, s) for e, p, s in zip(data.examples, preds, sc, strict=True)])
    assert entry["value"] == pytest.approx(2 / 3) and entry["parse_failure_rate"] == pytest.approx(1 / 3)
    ex = data.examples[0]
    assert t.prompt(ex, "qwen2vl") == ("Please provide the bounding box coordinate of the region this sentence "
                                       "describes: man on left")
    assert t.prompt(ex, "internvl").endswith("describes: <ref>man on left</ref>")
    assert t.prompt(ex).startswith("Bounding box coordinates are specified in the format (top-left x")
    with pytest.raises(OmniMergeError, match="unknown box format"):
        t.prompt(ex, "pixels")


# --- sampling --------------------------------------------------------------------------------------------------

def test_stratified_sample_is_proportional_seeded_and_not_the_head() -> None:
    strata = ["human"] * 30 + ["augmented"] * 10
    a = stratified_sample(strata, 8, seed=0)
    assert len(a) == 8 and a == sorted(a) and len(set(a)) == 8
    assert sum(strata[i] == "human" for i in a) == 6 and sum(strata[i] == "augmented" for i in a) == 2
    assert a == stratified_sample(strata, 8, seed=0)
    assert a != list(range(8))
    assert any(stratified_sample(strata, 8, seed=s) != a for s in range(1, 5))
    assert stratified_sample(strata, 100, seed=0) == list(range(40))


def test_limit_samples_by_question_type(tmp_path: Path) -> None:
    feats, rows = F.BUILDERS["chartqa"]()
    many = [{**rows[i % 2], "type": "human_test"} for i in range(30)] + [
        {**rows[2], "type": "augmented_test"} for _ in range(10)]
    path = F.save_disk(Dataset.from_list(many, features=feats), tmp_path / "c", "test")
    data = get_task("chartqa").load(path, limit=8, seed=3)
    kinds = [e.groups[0] for e in data.examples]
    assert kinds.count("human_test") == 6 and kinds.count("augmented_test") == 2
    assert [e.doc_id for e in data.examples] != list(range(8)) and data.n_examples == 40 and data.limit == 8


# --- bad input -------------------------------------------------------------------------------------------------

def test_unknown_task() -> None:
    with pytest.raises(OmniMergeError, match="unknown task 'mmmu'; known tasks: vizwiz, gqa"):
        get_task("mmmu")


def test_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        get_task("chartqa").load(tmp_path / "nowhere")


def test_hub_id_not_cached_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load hub dataset nobody-here/no-such-set.*HF_HUB_OFFLINE") as e:
        get_task("chartqa").load("nobody-here/no-such-set")
    assert "\n" not in str(e.value)


def test_missing_field(tmp_path: Path) -> None:
    ds = F.dataset("chartqa").remove_columns(["answer"])
    with pytest.raises(DataError, match=r"chartqa: .* has no field 'answer' \(fields: type, question, image\)"):
        get_task("chartqa").load(F.save_disk(ds, tmp_path / "c", "test"))
    with pytest.raises(DataError, match="has no image field 'image'"):
        get_task("chartqa").load(F.save_disk(F.dataset("chartqa").remove_columns(["image"]), tmp_path / "d", "test"))


def test_missing_split(layouts: dict[str, dict[str, Path]]) -> None:
    with pytest.raises(DataError, match=r"no split 'val' in the saved DatasetDict \(splits: test\)"):
        get_task("chartqa").load(layouts["chartqa"]["disk"], split="val")


def test_empty_split(tmp_path: Path) -> None:
    feats, _ = F.BUILDERS["chartqa"]()
    DatasetDict({"test": Dataset.from_dict({k: [] for k in feats}, features=feats)}).save_to_disk(str(tmp_path / "e"))
    with pytest.raises(DataError, match="chartqa: split 'test' of .* is empty"):
        get_task("chartqa").load(tmp_path / "e")
    empty = Dataset.from_dict({k: [] for k in feats}, features=feats)
    with pytest.raises(DataError, match="chartqa: split 'test' of .*test.parquet is empty"):
        get_task("chartqa").load(F.save_parquet(empty, tmp_path / "test.parquet"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        get_task("chartqa").load(tmp_path / "empty.jsonl")


def test_undecodable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    feats, rows = F.BUILDERS["chartqa"]()
    rows[1]["image"] = {"bytes": b"not an image at all", "path": None}
    rows[3]["image"] = {"bytes": F.encoded(F.png(40, 30))[:60], "path": None}   # a truncated PNG
    ds = Dataset.from_list(rows, features=feats)
    data = get_task("chartqa").load(F.save_disk(ds, tmp_path / "c", "test"))
    assert [e.doc_id for e in data.examples] == [0, 2]
    assert data.skipped == 2 and "row 1" in (data.skip_reason or "")
    # a JSONL naming a file that is not an image
    jl = F.save_jsonl(F.rows("chartqa")[:2], tmp_path / "j" / "d.jsonl")
    (jl.parent / "images" / "r0_image.png").write_bytes(b"garbage")
    data = get_task("chartqa").load(jl)
    assert [e.doc_id for e in data.examples] == [1] and data.skipped == 1


def test_every_image_undecodable_is_an_error(tmp_path: Path) -> None:
    jl = F.save_jsonl(F.rows("chartqa")[:1], tmp_path / "j" / "d.jsonl")
    (jl.parent / "images" / "r0_image.png").unlink()
    with pytest.raises(DataError, match="no image of .* could be decoded"):
        get_task("chartqa").load(jl)
