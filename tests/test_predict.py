"""Tests for stages/predict.py, with a tiny ONNX classifier built here and real fixture photos."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import predict
from modisch.images import load_image_file
from modisch.onnx_model import OnnxClassifier, write_metadata
from modisch.preprocess import preprocess, yolo_preprocessing

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "stages" / "predict.py"
REPLICA = ROOT / "tests" / "fixtures" / "replica"
POLO = REPLICA / "clothes" / "Clothes_Dataset" / "Polo"
SHOES = REPLICA / "shoes"

CLASSES = ["blazer", "boot", "dress", "flip-flop", "hoodie", "jacket", "loafer", "pants",
           "polo", "shirt", "short", "skirt", "slipper", "sneaker", "sweater", "t-shirt"]
IMAGE_SIZE = 32
THRESHOLD = 0.5

# Mean red, green and blue each push one class far ahead, so a pure red image gets a
# confidence near 1 and a dark grey one about 0.33. The noise makes every rank distinct.
WEIGHTS = (np.random.default_rng(0).normal(0.0, 1.0, (3, 16))
           + 12.0 * np.eye(3, 16)).astype(np.float32)
BIAS = np.linspace(-0.5, 0.5, 16, dtype=np.float32)

RED = (255, 0, 0)
DARK_GREY = (64, 64, 64)


def build_model(path: Path, threshold: float | None = THRESHOLD, batch: str | int = "batch") -> Path:
    """Save a classifier: mean colour per channel, times WEIGHTS, plus BIAS, then softmax."""
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "weights"], ["logits"]),
        helper.make_node("Add", ["logits", "bias"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "mean_colour",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                       [batch, 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 16])],
        initializer=[numpy_helper.from_array(WEIGHTS, "weights"),
                     numpy_helper.from_array(BIAS, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))

    metadata = {"classes": CLASSES, "image_size": IMAGE_SIZE,
                "preprocessing": yolo_preprocessing(IMAGE_SIZE), "output": "probabilities"}
    if threshold is not None:
        metadata["threshold"] = threshold
    write_metadata(path, metadata)
    return path


def expected_probabilities(image: Image.Image) -> np.ndarray:
    """Compute the tiny model's output in numpy, independently of onnxruntime."""
    pixels = preprocess(image, yolo_preprocessing(IMAGE_SIZE)).astype(np.float64)
    scores = pixels.mean(axis=(1, 2)) @ WEIGHTS + BIAS
    exponentials = np.exp(scores - scores.max())
    return exponentials / exponentials.sum()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "model.onnx")


def solid_image(folder: Path, name: str, colour: tuple[int, int, int]) -> Path:
    path = folder / name
    Image.new("RGB", (48, 40), colour).save(path)
    return path


def run_predict(capsys, model: Path, *args) -> str:
    predict.main([*map(str, args), "--model", str(model)])
    return capsys.readouterr().out


def parse(text: str, output_format: str) -> list[dict]:
    """Read either output format into JSON's row shape, so checks can be shared."""
    if output_format == "json":
        return json.loads(text)

    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        top_k = []
        for entry in filter(None, row["top_k"].split(";")):
            label, probability = entry.rsplit(":", 1)
            top_k.append({"label": label, "probability": float(probability)})
        rows.append({
            "file": row["file"],
            "label": row["label"] or None,
            "confidence": float(row["confidence"]) if row["confidence"] else None,
            "top_k": top_k,
            "uncertain": {"true": True, "false": False, "": None}[row["uncertain"]],
            "error": row["error"] or None,
        })
    return rows


def test_csv_header_and_values(capsys, model):
    text = run_predict(capsys, model, POLO, "--format", "csv")

    lines = text.splitlines()
    assert lines[0] == "file,label,confidence,top_k,uncertain,error"
    first = next(csv.DictReader(io.StringIO(text)))
    assert first["label"] in CLASSES
    assert first["uncertain"] in ("true", "false")
    assert first["top_k"].startswith(f"{first['label']}:")
    assert first["top_k"].count(";") == 2
    assert first["error"] == ""


@pytest.mark.parametrize("output_format", ["csv", "json"])
@pytest.mark.parametrize("kind", ["files", "folder", "glob", "recursive glob"])
def test_outputs_for_input_kinds(capsys, model, output_format, kind):
    polo_files = sorted(POLO.glob("*.jpg"))
    inputs = {
        "files": [polo_files[2], polo_files[0]],
        "folder": [POLO],
        "glob": [POLO / "*.jpg"],
        "recursive glob": [REPLICA / "**" / "Polo" / "*.jpg"],
    }[kind]
    expected_files = [polo_files[0], polo_files[2]] if kind == "files" else polo_files

    rows = parse(run_predict(capsys, model, *inputs, "--format", output_format), output_format)

    assert [row["file"] for row in rows] == [str(path) for path in expected_files]
    for row in rows:
        assert row["error"] is None
        assert row["label"] in CLASSES
        assert row["label"] == row["top_k"][0]["label"]
        assert len(row["top_k"]) == 3
        assert row["confidence"] == pytest.approx(row["top_k"][0]["probability"], abs=1e-4)
        assert row["uncertain"] == (row["confidence"] < THRESHOLD)


def test_folder_searched_recursively(capsys, model):
    rows = parse(run_predict(capsys, model, SHOES, "--format", "json"), "json")

    expected = sorted(str(path) for path in SHOES.rglob("*") if path.is_file())
    assert [row["file"] for row in rows] == expected
    assert all(row["error"] is None for row in rows)


def test_file_in_two_inputs_listed_once(capsys, model):
    photo = sorted(POLO.glob("*.jpg"))[0]

    rows = parse(run_predict(capsys, model, POLO, photo, "--format", "json"), "json")

    files = [row["file"] for row in rows]
    assert files.count(str(photo)) == 1
    assert len(files) == len(list(POLO.glob("*.jpg")))


@pytest.mark.parametrize("top_k, expected_length", [(1, 1), (3, 3), (16, 16), (40, 16)])
def test_top_k_order_and_length(capsys, model, top_k, expected_length):
    photo = sorted(POLO.glob("*.jpg"))[0]

    rows = parse(run_predict(capsys, model, photo, "--top-k", top_k, "--format", "json"), "json")

    ranked = rows[0]["top_k"]
    probabilities = [entry["probability"] for entry in ranked]
    assert len(ranked) == expected_length
    assert probabilities == sorted(probabilities, reverse=True)
    assert len({entry["label"] for entry in ranked}) == expected_length

    expected = expected_probabilities(load_image_file(photo).image)
    expected_order = [CLASSES[i] for i in np.argsort(-expected, kind="stable")[:expected_length]]
    assert [entry["label"] for entry in ranked] == expected_order
    np.testing.assert_allclose(probabilities, np.sort(expected)[::-1][:expected_length],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_threshold, options, colour, expected", [
    (THRESHOLD, [], RED, False),
    (THRESHOLD, [], DARK_GREY, True),
    (THRESHOLD, ["--threshold", "0"], DARK_GREY, False),
    (THRESHOLD, ["--threshold", "0.2"], DARK_GREY, False),
    (THRESHOLD, ["--threshold", "1"], RED, True),
    (None, [], DARK_GREY, False),
    (None, ["--threshold", "0.9"], DARK_GREY, True),
])
@pytest.mark.parametrize("output_format", ["csv", "json"])
def test_uncertain_flag(capsys, tmp_path, model_threshold, options, colour, expected,
                        output_format):
    model = build_model(tmp_path / "model.onnx", threshold=model_threshold)
    image = solid_image(tmp_path, "solid.png", colour)

    rows = parse(run_predict(capsys, model, image, *options, "--format", output_format),
                 output_format)

    assert rows[0]["uncertain"] is expected


def solid_jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("truncated.jpg", solid_jpeg_bytes()[:2000], "corrupt"),
    ("garbage.jpg", b"\xff\xd8\xff" + bytes(range(256)) * 4, "corrupt"),
    ("notes.txt", b"shirt, polo, dress\n", "not_an_image"),
    ("photo.jpg", b"This is a text file named like a photo.\n", "not_an_image"),
    ("empty.png", b"", "empty_file"),
])
@pytest.mark.parametrize("output_format", ["csv", "json"])
def test_bad_file_listed_with_reason(capsys, caplog, model, tmp_path, name, content, reason,
                                     output_format):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = solid_image(folder, "a_red.png", RED)
    bad = folder / name
    bad.write_bytes(content)

    rows = parse(run_predict(capsys, model, folder, "--format", output_format), output_format)

    by_file = {row["file"]: row for row in rows}
    assert set(by_file) == {str(good), str(bad)}
    assert by_file[str(good)]["label"] == CLASSES[0]
    assert by_file[str(bad)]["label"] is None
    assert by_file[str(bad)]["confidence"] is None
    assert by_file[str(bad)]["top_k"] == []
    assert by_file[str(bad)]["error"].startswith(f"{reason}: ")
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any(str(bad) in message and reason in message for message in warnings)


@pytest.mark.parametrize("mode, name", [
    ("L", "grey.png"), ("P", "palette.png"), ("RGBA", "alpha.png"), ("CMYK", "cmyk.jpg"),
    ("I;16", "sixteen_bit.tif"),
])
def test_colour_modes_classified(capsys, model, tmp_path, mode, name):
    path = tmp_path / name
    Image.new("RGB", (40, 40), RED).convert(mode).save(path)

    rows = parse(run_predict(capsys, model, path, "--format", "json"), "json")

    assert rows[0]["error"] is None
    assert rows[0]["label"] in CLASSES


def test_batch_and_single_probabilities_equal(model):
    classifier = OnnxClassifier(model)
    images = [load_image_file(path).image for path in sorted(REPLICA.rglob("*.jp*g"))[:12]]

    batch = classifier.predict(images)
    singles = np.concatenate([classifier.predict([image]) for image in images])

    assert batch.shape == (12, 16)
    np.testing.assert_allclose(batch, singles, rtol=0, atol=1e-6)


def test_batch_option_keeps_output(capsys, model):
    outputs = []
    for batch in (1, 7, 32):
        outputs.append(parse(run_predict(capsys, model, POLO, "--batch", batch, "--format", "json"),
                             "json"))

    for rows in outputs[1:]:
        assert [row["file"] for row in rows] == [row["file"] for row in outputs[0]]
        assert [row["label"] for row in rows] == [row["label"] for row in outputs[0]]
        np.testing.assert_allclose([row["confidence"] for row in rows],
                                   [row["confidence"] for row in outputs[0]], rtol=0, atol=1e-6)


def test_fixed_batch_model_runs_one_by_one(capsys, caplog, tmp_path):
    model = build_model(tmp_path / "fixed.onnx", batch=1)

    rows = parse(run_predict(capsys, model, POLO, "--batch", 8, "--format", "json"), "json")

    assert len(rows) == len(list(POLO.glob("*.jpg")))
    assert all(row["error"] is None for row in rows)
    assert any("fixed batch size of 1" in record.getMessage() for record in caplog.records)


def test_output_file_option(capsys, model, tmp_path):
    output = tmp_path / "results" / "predictions.json"

    stdout = run_predict(capsys, model, POLO, "--format", "json", "--output", output)

    assert stdout == ""
    rows = json.loads(output.read_text(encoding="utf-8"))
    assert len(rows) == len(list(POLO.glob("*.jpg")))


def test_missing_model_message(tmp_path):
    missing = tmp_path / "models" / "model.onnx"

    with pytest.raises(SystemExit) as raised:
        predict.main([str(POLO), "--model", str(missing)])

    message = str(raised.value)
    assert str(missing) in message
    assert "dvc repro export" in message
    assert "--model" in message


def test_invalid_model_message(tmp_path):
    not_a_model = tmp_path / "model.onnx"
    not_a_model.write_text("not a model\n")

    with pytest.raises(SystemExit) as raised:
        predict.main([str(POLO), "--model", str(not_a_model)])

    assert str(not_a_model) in str(raised.value)
    assert "invalid ONNX model" in str(raised.value)


@pytest.mark.parametrize("kind", ["missing file", "glob without match", "empty folder"])
def test_input_matching_nothing(model, tmp_path, kind):
    (tmp_path / "empty").mkdir()
    unmatched = {
        "missing file": tmp_path / "missing.jpg",
        "glob without match": tmp_path / "*.webp",
        "empty folder": tmp_path / "empty",
    }[kind]

    with pytest.raises(SystemExit) as raised:
        predict.main([str(POLO), str(unmatched), "--model", str(model)])

    assert str(unmatched) in str(raised.value)


@pytest.mark.parametrize("option, value", [
    ("--top-k", "0"), ("--batch", "0"), ("--threshold", "1.5"), ("--format", "xml"),
])
def test_invalid_option_rejected(capsys, model, option, value):
    with pytest.raises(SystemExit) as raised:
        predict.main([str(POLO), option, value, "--model", str(model)])

    assert raised.value.code == 2
    assert option in capsys.readouterr().err


# Fails any import of torch or ultralytics and records the attempt, then runs the script.
NO_TORCH_RUNNER = """
import json, runpy, sys

class BlockTorch:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "ultralytics"):
            self.attempts.append(name)
            raise ImportError(f"import of {name} is blocked")
        return None

blocker = BlockTorch()
sys.meta_path.insert(0, blocker)
script, report, *arguments = sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
sys.argv = [script, *arguments]
runpy.run_path(script, run_name="__main__")
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "ultralytics"))
with open(report, "w") as file:
    json.dump({"attempts": blocker.attempts, "loaded": loaded}, file)
"""


def test_script_imports_no_torch(model, tmp_path):
    report = tmp_path / "imports.json"
    photo = sorted(POLO.glob("*.jpg"))[0]

    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_RUNNER, str(SCRIPT), str(report), str(photo),
         "--model", str(model), "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["label"] in CLASSES
    imports = json.loads(report.read_text())
    assert imports["loaded"] == []
    assert imports["attempts"] == []
    assert "predict:" in result.stderr
