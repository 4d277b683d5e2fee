"""End-to-end: the whole DVC pipeline on the real fixture photos, with tiny settings.

Copies the project into a temporary git + DVC repository, points both sources at zips
laid out like the Kaggle downloads, and runs ``dvc repro`` with a small image size and
one epoch. Slow (a few minutes on 2 cores), so every check shares one run.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from param_changes import apply_changes

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "replica"
PROJECT_FILES = ["stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"]
STAGES = ["fetch@clothes", "fetch@shoes", "ingest@clothes", "ingest@shoes", "remap", "split",
          "balance", "train", "export", "evaluate"]


def zip_folder(folder: Path, archive: Path) -> None:
    """Zip ``folder``'s contents with paths relative to it, like the Kaggle downloads."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())


def run(command: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
        f"{result.stderr[-6000:]}")
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    """Return the stages that ``dvc repro`` reports as run in its output."""
    return {name for name in STAGES if f"Running stage '{name}'" in output}


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = apply_changes(yaml.safe_load(path.read_text(encoding="utf-8")), changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    environment = dict(os.environ)
    # `python` in dvc.yaml must be the interpreter running the tests.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment["YOLO_CONFIG_DIR"] = str(tmp_path_factory.mktemp("ultralytics"))
    environment["DVC_NO_ANALYTICS"] = "1"
    environment["GIT_AUTHOR_NAME"] = environment["GIT_COMMITTER_NAME"] = "modisch tests"
    environment["GIT_AUTHOR_EMAIL"] = environment["GIT_COMMITTER_EMAIL"] = "tests@localhost"
    return environment


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env) -> Path:
    """A copy of the project after one full ``dvc repro`` and a commit of its results."""
    base = tmp_path_factory.mktemp("pipeline")
    sources = base / "downloads"
    sources.mkdir()
    zip_folder(FIXTURES / "clothes", sources / "clothes-dataset.zip")
    zip_folder(FIXTURES / "shoes", sources / "shoe-dataset.zip")

    project = base / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, project / name)
    run(["git", "init", "-q"], project, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], project, env)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], project, env)
    set_params(project, {
        "sources.clothes.path": str(sources / "clothes-dataset.zip"),
        "sources.shoes.path": str(sources / "shoe-dataset.zip"),
        "train.model": "yolov8n-cls.yaml",
        "train.epochs": 3,
        "train.imgsz": 64,
        "train.batch": 32,
    })

    output = run([sys.executable, "-m", "dvc", "repro"], project, env)
    assert stages_run(output) == set(STAGES)
    run(["git", "add", "-A"], project, env)
    run(["git", "commit", "-q", "-m", "first run"], project, env)
    return project


def test_pipeline_writes_model_metrics_and_plots(repo):
    report = json.loads((repo / "metrics" / "eval.json").read_text())
    for key in ("top1", "top5", "macro_f1", "weighted_f1", "threshold", "ece",
                "coverage_at_threshold", "macro_f1_at_threshold", "per_source"):
        assert key in report, key
    assert set(report["per_class"]) == set(yaml.safe_load((repo / "params.yaml").read_text())["classes"])
    assert report["images"] > 0
    for name in ("confusion_test.png", "confusion_test_normalised.png", "threshold_test.png",
                 "per_class_f1_test.png", "reliability_test.png", "mistakes_test.png"):
        assert (repo / "plots" / "eval" / name).stat().st_size > 0, name
    assert (repo / "models" / "model.onnx").is_file()


def test_pipeline_onnx_metadata_describes_model(repo):
    sys.path.insert(0, str(repo / "stages"))
    from modisch.onnx_model import OnnxClassifier

    classifier = OnnxClassifier(repo / "models" / "model.onnx")
    classes = yaml.safe_load((repo / "params.yaml").read_text())["classes"]
    assert sorted(classifier.classes) == sorted(classes)
    assert classifier.preprocessing["size"] == 64
    assert classifier.metadata["output"] == "probabilities"
    assert 0.0 <= classifier.threshold < 1.0
    assert len(classifier.metadata["params_hash"]) == 16


def test_pipeline_splits_hold_no_augmented_copies(repo):
    index = (repo / "data" / "dataset" / "index.csv").read_text().splitlines()
    header = index[0].split(",")
    split_column, augmented_column = header.index("split"), header.index("augmented_from")
    for line in index[1:]:
        fields = line.split(",")
        if fields[augmented_column]:
            assert fields[split_column] == "train", line
    for split in ("val", "test"):
        names = [p.name for p in (repo / "data" / "dataset" / split).rglob("*.jpg")]
        assert names
        assert not any("-aug" in name for name in names)


def test_pipeline_same_file_names_all_kept(repo):
    manifest = (repo / "data" / "ingested" / "shoes" / "manifest.csv").read_text().splitlines()
    images = {line.split(",")[-1] for line in manifest[1:]}
    source_files = sum(1 for p in (FIXTURES / "shoes").rglob("*") if p.is_file())
    assert len(manifest) - 1 == source_files
    assert len(images) == source_files


def test_dvc_metrics_and_plots_show(repo, env, tmp_path):
    metrics = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo, env))
    files = next(iter(metrics.values()))["data"]
    assert "top1" in files["metrics/eval.json"]["data"]
    assert "parity" in files["metrics/export.json"]["data"]

    out = tmp_path / "plots"
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], repo, env)
    page = (out / "index.html").read_text()
    assert "Test confusion matrix" in page
    assert "confusion_test.png" in page


def test_onnx_top1_matches_ultralytics_val(repo, env):
    # Validate through links, as the train stage does, so data/dataset stays unchanged.
    script = (
        "import sys, tempfile\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, 'stages')\n"
        "from modisch.yolo import offline_ultralytics\n"
        "from train import link_dataset\n"
        "offline_ultralytics(Path('.ultralytics'), None)\n"
        "from ultralytics import YOLO\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    data = link_dataset(Path('data/dataset'), Path(tmp))\n"
        "    metrics = YOLO('models/best.pt').val(data=str(data), split='test', imgsz=64,\n"
        "                                         batch=16, plots=False, verbose=False)\n"
        "print('TOP1', metrics.top1)\n"
    )
    output = run([sys.executable, "-c", script], repo, env)
    ultralytics_top1 = float(output.split("TOP1")[-1].split()[0])
    onnx_top1 = json.loads((repo / "metrics" / "eval.json").read_text())["top1"]
    assert abs(onnx_top1 - ultralytics_top1) <= 0.005


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"sources.shoes.class_map.soccer_shoes": "boot"},
         {"remap", "split", "balance", "train", "export", "evaluate"}),
        ({"balance.seed": 7}, {"balance", "train", "export", "evaluate"}),
        ({"evaluate.gallery_size": 5}, {"evaluate"}),
    ],
    ids=["class-map", "balance", "evaluate"],
)
def test_param_change_reruns_only_downstream(repo, env, changes, expected):
    run(["git", "reset", "-q", "--hard"], repo, env)
    run([sys.executable, "-m", "dvc", "checkout", "-q"], repo, env)
    set_params(repo, changes)
    output = run([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert stages_run(output) == expected


def test_experiments_compare_in_metrics_and_plots_diff(repo, env, tmp_path):
    run(["git", "reset", "-q", "--hard"], repo, env)
    run([sys.executable, "-m", "dvc", "checkout", "-q"], repo, env)
    dvc = [sys.executable, "-m", "dvc"]
    for name, epochs in (("one-epoch", 1), ("two-epochs", 2)):
        run(dvc + ["exp", "run", "-q", "-n", name, "-S", f"train.epochs={epochs}"], repo, env)

    diff = json.loads(run(dvc + ["metrics", "diff", "one-epoch", "two-epochs", "--all", "--json"],
                          repo, env))
    assert "top1" in diff["metrics/eval.json"]
    assert diff["metrics/train.json"]["epochs_run"]["old"] == 1
    assert diff["metrics/train.json"]["epochs_run"]["new"] == 2

    out = tmp_path / "diff"
    run(dvc + ["plots", "diff", "one-epoch", "two-epochs", "-o", str(out)], repo, env)
    page = (out / "index.html").read_text()
    assert "one-epoch" in page
    assert "two-epochs" in page
