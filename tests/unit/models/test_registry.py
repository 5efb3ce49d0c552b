"""The registry reads cards from weights/<name>/<version>/ and refuses weights whose sha256 differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from triage.config import Settings
from triage.errors import ModelLoadError, NotFoundError
from triage.models.registry import ModelRegistry, sha256_file
from triage.models.runtime import load_members

SHIPPED = Settings().weights_dir


def _copy_model(tmp_path: Path, name: str) -> Path:
    src = sorted(p for p in (SHIPPED / name).iterdir() if p.is_dir())[-1]
    dst = tmp_path / name / src.name
    shutil.copytree(src, dst)
    return dst


def test_shipped_models_verify() -> None:
    registry = ModelRegistry(SHIPPED)
    assert not registry.problems
    assert {"ct-head-ich", "xr-chest-pneumothorax"} <= set(registry.names())
    for model in registry.all():
        model.verify()


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    folder = _copy_model(tmp_path, "xr-chest-pneumothorax")
    card = json.loads((folder / "card.json").read_text())
    onnx = folder / card["weights"][0]["file"]
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    model = ModelRegistry(tmp_path).get("xr-chest-pneumothorax")
    with pytest.raises(ModelLoadError, match="sha256"):
        model.verify()
    with pytest.raises(ModelLoadError, match="refusing"):
        load_members(model, ["CPUExecutionProvider"])


def test_newest_version_is_active_and_unknown_names_are_clear(tmp_path: Path) -> None:
    folder = _copy_model(tmp_path, "xr-chest-pneumothorax")
    newer = folder.parent / "9.0.0"
    shutil.copytree(folder, newer)
    card = json.loads((newer / "card.json").read_text())
    card["version"] = "9.0.0"
    (newer / "card.json").write_text(json.dumps(card))
    registry = ModelRegistry(tmp_path)
    assert registry.get("xr-chest-pneumothorax").card.version == "9.0.0"
    assert registry.get("xr-chest-pneumothorax", folder.name).card.version == folder.name
    with pytest.raises(NotFoundError, match="no model named"):
        registry.get("ct-abdomen-nothing")


def test_card_that_disagrees_with_its_folder_is_reported(tmp_path: Path) -> None:
    folder = _copy_model(tmp_path, "xr-chest-pneumothorax")
    card = json.loads((folder / "card.json").read_text())
    card["version"] = "0.0.1-wrong"
    (folder / "card.json").write_text(json.dumps(card))
    registry = ModelRegistry(tmp_path)
    assert registry.names() == []
    assert any("folder says" in p for p in registry.problems)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
