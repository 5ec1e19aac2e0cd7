"""Tiny copies of the evaluation datasets in their hub format (field names and types as on the hub, small PIL
images), and writers for the three local layouts users have: save_to_disk, parquet, JSONL with image files."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

S = Value("string")
I64 = Value("int64")


def png(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> PILImage.Image:
    return PILImage.new("RGB", (w, h), color)


def _vqav2() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({
        "question_type": S, "multiple_choice_answer": S,
        "answers": List({"answer": S, "answer_confidence": S, "answer_id": I64}),
        "image_id": I64, "answer_type": S, "question_id": I64, "question": S, "image": Image(),
    })

    def answers(words: list[str]) -> list[dict[str, Any]]:
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    rows = [
        {"question_type": "what color", "multiple_choice_answer": "red", "answer_type": "other",
         "answers": answers(["red"] * 6 + ["dark red"] * 2 + ["maroon", "Red"]), "image_id": 1,
         "question_id": 10, "question": "What color is the bus?", "image": png(20, 16)},
        {"question_type": "how many", "multiple_choice_answer": "2", "answer_type": "number",
         "answers": answers(["2", "2", "two", "3", "3", "3", "2", "4", "2", "2"]), "image_id": 2,
         "question_id": 11, "question": "How many dogs are there?", "image": png(24, 18)},
        {"question_type": "is this", "multiple_choice_answer": "yes", "answer_type": "yes/no",
         "answers": answers(["yes"] * 10), "image_id": 3, "question_id": 12, "question": "Is this a cat?",
         "image": png(16, 16)},
    ]
    return feats, rows


def _vizwiz() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"question_id": S, "image": Image(), "question": S, "answers": List(S), "category": S})
    rows = [
        {"question_id": "VizWiz_val_00000000.jpg", "image": png(30, 20), "question": "what is THIS?",
         "answers": ["unanswerable"] * 7 + ["a can", "soda", "unsuitable"], "category": "unanswerable"},
        {"question_id": "VizWiz_val_00000001.jpg", "image": png(20, 30), "question": "what color is this shirt?",
         "answers": ["blue", "blue", "light blue", "blue", "navy", "blue", "blue", "dark blue", "blue", "blue"],
         "category": "other"},
    ]
    return feats, rows


def _gqa() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({
        "id": S, "imageId": S, "question": S, "answer": S, "fullAnswer": S, "isBalanced": Value("bool"),
        "groups": {"global": S, "local": S}, "entailed": S, "equivalent": S,
        "types": {"structural": S, "semantic": S, "detailed": S},
        "semantic": List({"operation": S, "argument": S, "dependencies": List(I64)}), "semanticStr": S,
    })

    def q(i: int, image: str, question: str, answer: str, structural: str) -> dict[str, Any]:
        return {"id": f"2013{i}", "imageId": image, "question": question, "answer": answer,
                "fullAnswer": f"The answer is {answer}.", "isBalanced": True, "groups": {"global": "", "local": ""},
                "entailed": "", "equivalent": "", "types": {"structural": structural, "semantic": "attr",
                                                             "detailed": "color"},
                "semantic": [{"operation": "select", "argument": "x", "dependencies": []}], "semanticStr": "x"}

    rows = [q(0, "n1", "What color is the car?", "white", "query"),
            q(1, "n2", "Is the man on the left?", "yes", "verify"),
            q(2, "n1", "Which side is the tree on?", "right", "choose"),
            q(3, "n2", "Is it sunny or cloudy?", "sunny", "choose")]
    return feats, rows


def gqa_images() -> Dataset:
    feats = Features({"id": S, "image": Image()})
    return Dataset.from_list([{"id": "n1", "image": png(40, 30)}, {"id": "n2", "image": png(30, 40)}],
                             features=feats)


def _mathvista() -> tuple[Features, list[dict[str, Any]]]:
    meta = {"category": S, "context": S, "grade": S, "img_height": I64, "img_width": I64, "language": S,
            "skills": List(S), "source": S, "split": S, "task": S}
    feats = Features({"pid": S, "question": S, "image": S, "decoded_image": Image(), "choices": List(S),
                      "unit": S, "precision": Value("float64"), "answer": S, "question_type": S,
                      "answer_type": S, "metadata": meta, "query": S})

    def row(pid: str, question: str, choices: list[str] | None, answer: str, qtype: str, atype: str,
            task: str, skills: list[str], unit: str | None = None, precision: float | None = None) -> dict[str, Any]:
        return {"pid": pid, "question": question, "image": f"images/{pid}.jpg", "decoded_image": png(32, 24),
                "choices": choices, "unit": unit, "precision": precision, "answer": answer, "question_type": qtype,
                "answer_type": atype, "query": f"Hint: ...\nQuestion: {question}",
                "metadata": {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
                             "img_height": 24, "img_width": 32, "language": "english", "skills": skills,
                             "source": "Geometry3K", "split": "testmini", "task": task}}

    rows = [
        row("1", "Find the measure of angle 1.", ["30°", "45°", "60°", "145°"], "145°", "multi_choice", "text",
            "geometry problem solving", ["geometry reasoning", "algebraic reasoning"]),
        row("2", "What is the length of AB?", None, "12", "free_form", "integer", "geometry problem solving",
            ["geometry reasoning"], unit="cm"),
        row("3", "What fraction of the bar is shaded?", None, "0.35", "free_form", "float", "figure question answering",
            ["arithmetic reasoning"], precision=2.0),
        row("4", "Which function grows fastest?", ["f", "g", "h"], "g", "multi_choice", "text", "textbook question answering",
            ["algebraic reasoning"]),
        row("5", "List the x-intercepts.", None, "[1, 3]", "free_form", "list", "textbook question answering",
            ["algebraic reasoning"]),
    ]
    return feats, rows


def _mathvision() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"id": S, "question": S, "options": List(S), "image": S, "decoded_image": Image(),
                      "answer": S, "solution": S, "level": I64, "subject": S})
    rows = [
        {"id": "1", "question": "Which angle is the largest?", "options": ["10", "20", "30", "40", "50"],
         "image": "images/1.jpg", "decoded_image": png(20, 20), "answer": "C", "solution": "", "level": 2,
         "subject": "metric geometry - angle"},
        {"id": "2", "question": "What is the area of the square?", "options": [], "image": "images/2.jpg",
         "decoded_image": png(22, 20), "answer": "16", "solution": "", "level": 1,
         "subject": "metric geometry - area"},
        {"id": "3", "question": "How many cubes are hidden?", "options": [], "image": "images/3.jpg",
         "decoded_image": png(20, 22), "answer": "2.5", "solution": "", "level": 3, "subject": "counting"},
    ]
    return feats, rows


def _geometry3k() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"images": List(Image()), "problem": S, "choices": List(S), "ground_truth": S})
    rows = [
        {"images": [png(24, 20)], "problem": "Find x.", "choices": ["3", "4", "5", "6"], "ground_truth": "C"},
        {"images": [png(20, 24)], "problem": "Find the area of a triangle.", "choices": ["12", "24", "36", "48"],
         "ground_truth": "B"},
    ]
    return feats, rows


def _chartqa() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"type": S, "question": S, "answer": S, "image": Image()})
    rows = [
        {"type": "human_test", "question": "What is the share of Apple?", "answer": "45", "image": png(40, 30)},
        {"type": "human_test", "question": "Which year had the peak?", "answer": "2019", "image": png(40, 30)},
        {"type": "augmented_test", "question": "What percentage is blue?", "answer": "0.3", "image": png(40, 30)},
        {"type": "augmented_test", "question": "Which color is the largest?", "answer": "Red", "image": png(40, 30)},
    ]
    return feats, rows


def _textvqa() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"image_id": S, "question_id": I64, "question": S, "question_tokens": List(S), "image": Image(),
                      "image_width": I64, "image_height": I64, "flickr_original_url": S, "flickr_300k_url": S,
                      "answers": List(S), "image_classes": List(S), "set_name": S, "ocr_tokens": List(S)})
    rows = [
        {"image_id": "003a8ae2ef43b901", "question_id": 34602, "question": "what is the brand of this camera?",
         "question_tokens": ["what", "is"], "image": png(30, 30), "image_width": 30, "image_height": 30,
         "flickr_original_url": "", "flickr_300k_url": "", "answers": ["nous les gosses", "dakota", "clos culombu",
                                                                       "dakota digital", "dakota", "dakota",
                                                                       "dakota digital", "dakota digital", "dakota",
                                                                       "dakota"],
         "image_classes": ["Camera"], "set_name": "val", "ocr_tokens": ["DAKOTA", "DIGITAL"]},
    ]
    return feats, rows


def _ocrvqa() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"image_id": S, "questions": List(S), "answers": List(S), "ocr_tokens": List(S), "title": S,
                      "authorName": S, "genre": S, "image_width": I64, "image_height": I64, "image_url": S,
                      "set_name": S, "image": Image()})
    rows = [
        {"image_id": "000", "questions": ["Who wrote this book?", "What is the title of this book?",
                                          "Is this a comedy book?"],
         "answers": ["Jane Austen", "Emma", "No"], "ocr_tokens": [], "title": "Emma", "authorName": "Jane Austen",
         "genre": "Literature", "image_width": 20, "image_height": 30, "image_url": "", "set_name": "test",
         "image": png(20, 30)},
        {"image_id": "001", "questions": ["What is the genre of this book?"], "answers": ["Travel"],
         "ocr_tokens": [], "title": "Rome", "authorName": "X", "genre": "Travel", "image_width": 20,
         "image_height": 30, "image_url": "", "set_name": "test", "image": png(20, 30)},
    ]
    return feats, rows


def _ocrbench() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"dataset": S, "question": S, "question_type": S, "answer": List(S), "image": Image()})
    rows = [
        {"dataset": "IIIT5K", "question": "what is written in the image?", "question_type": "Regular Text Recognition",
         "answer": ["CHAIR"], "image": png(30, 10)},
        {"dataset": "HME100k", "question": "Please write out the expression of the formula in the image using LaTeX "
         "format.", "question_type": "Handwritten Mathematical Expression Recognition",
         "answer": ["x ^ { 2 } + 1"], "image": png(30, 10)},
        {"dataset": "docVQA", "question": "What is the date?", "question_type": "Doc-oriented VQA",
         "answer": ["1 May 1990", "May 1, 1990"], "image": png(30, 40)},
    ]
    return feats, rows


def _docvqa() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"questionId": S, "question": S, "question_types": List(S), "image": Image(), "docId": I64,
                      "ucsf_document_id": S, "ucsf_document_page_no": S, "answers": List(S), "data_split": S})
    rows = [
        {"questionId": "337", "question": "what is the date mentioned in this letter?",
         "question_types": ["handwritten", "form"], "image": png(30, 40), "docId": 279,
         "ucsf_document_id": "yhjb0228", "ucsf_document_page_no": "1", "answers": ["1/8/93"],
         "data_split": "val"},
        {"questionId": "338", "question": "what is the contact person name mentioned in letter?",
         "question_types": ["layout"], "image": png(30, 40), "docId": 279, "ucsf_document_id": "yhjb0228",
         "ucsf_document_page_no": "1", "answers": ["P. Carter", "p. carter"], "data_split": "val"},
    ]
    return feats, rows


def _refcoco() -> tuple[Features, list[dict[str, Any]]]:
    feats = Features({"question_id": S, "image": Image(), "question": S, "answer": List(S),
                      "segmentation": List(Value("float32")), "bbox": List(Value("float32")),
                      "iscrowd": Value("int8"), "file_name": S})
    q = "Please carefully observe the area circled in the image and come up with a caption for the area."
    rows = [
        # a 200x100 image; the box [x, y, w, h] = [20, 10, 80, 40] -> [0.1, 0.1, 0.5, 0.5] normalised
        {"question_id": "0", "image": png(200, 100), "question": q, "answer": ["man on left", "guy in red"],
         "segmentation": [20.0, 10.0, 100.0, 50.0], "bbox": [20.0, 10.0, 80.0, 40.0], "iscrowd": 0,
         "file_name": "COCO_train2014_000000000001_1.jpg"},
        {"question_id": "1", "image": png(100, 200), "question": q, "answer": ["tree"],
         "segmentation": [0.0, 0.0, 50.0, 100.0], "bbox": [0.0, 0.0, 50.0, 100.0], "iscrowd": 0,
         "file_name": "COCO_train2014_000000000002_1.jpg"},
    ]
    return feats, rows


BUILDERS = {
    "vqav2": _vqav2, "vizwiz": _vizwiz, "gqa": _gqa, "mathvista": _mathvista, "mathvision": _mathvision,
    "geometry3k": _geometry3k, "chartqa": _chartqa, "textvqa": _textvqa, "ocrvqa": _ocrvqa,
    "ocrbench": _ocrbench, "docvqa": _docvqa, "refcoco": _refcoco, "refcoco_plus": _refcoco,
    "refcocog": _refcoco,
}


def dataset(task: str) -> Dataset:
    feats, rows = BUILDERS[task]()
    return Dataset.from_list(rows, features=feats)


def rows(task: str) -> list[dict[str, Any]]:
    return BUILDERS[task]()[1]


def save_disk(ds: Dataset, folder: Path, split: str) -> Path:
    DatasetDict({split: ds}).save_to_disk(str(folder))
    return folder


def save_parquet(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path


def _jsonable(value: Any, images: Path, stem: str) -> Any:
    if isinstance(value, PILImage.Image):
        images.mkdir(parents=True, exist_ok=True)
        p = images / f"{stem}.png"
        value.save(p)
        return f"{images.name}/{p.name}"
    if isinstance(value, list):
        return [_jsonable(v, images, f"{stem}_{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _jsonable(v, images, f"{stem}_{k}") for k, v in value.items()}
    return value


def save_jsonl(task_rows: list[dict[str, Any]], path: Path) -> Path:
    """A JSONL whose image fields are paths relative to it (images/ beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, r in enumerate(task_rows):
            f.write(json.dumps({k: _jsonable(v, path.parent / "images", f"r{i}_{k}") for k, v in r.items()}) + "\n")
    return path


def encoded(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
