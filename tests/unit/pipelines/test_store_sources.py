"""Pipelines read instances through a store by key: from the local store, from bytes fetched onto another node
(what a Ray task away from the store's disk gets), or from file paths (`triage infer PATH`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.dicom_factory import make_ct_series
from triage.cli import infer_path
from triage.config import REPO_ROOT, Settings
from triage.dicom.store import DicomStore
from triage.domain import InstanceMeta, SeriesInfo
from triage.errors import InvalidStudyError
from triage.models.registry import ModelRegistry
from triage.pipelines.runner import _ray_preprocess
from triage.storage import LocalStore, MemorySource, PathSource, fetch
from triage.training.synth_xray import generate_dataset


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(REPO_ROOT / "weights")


def _stored_series(tmp_path: Path) -> tuple[LocalStore, SeriesInfo, list]:
    metas: list[InstanceMeta] = []
    store = DicomStore(LocalStore(tmp_path / "dicom"), "salt", index=lambda meta: metas.append(meta) is None)
    datasets = make_ct_series(12, rows=64, columns=64)
    for ds in datasets:
        store.write(ds)
    series = SeriesInfo(metas[0].series_uid, "CT", metas[0].sop_class_uid, len(metas), tuple(m.key for m in metas))
    return store.files, series, datasets  # type: ignore[return-value]


def test_a_task_away_from_the_store_reads_fetched_bytes_not_the_file_system(tmp_path: Path, registry) -> None:
    files, series, _ = _stored_series(tmp_path)
    card_json = registry.get("ct-head-ich").card.model_dump(mode="json")

    # In the analysis process, next to the store: the series' bytes, by key, into an object that travels (Ray
    # pickles it into its object store).
    fetched = fetch(files, series.files)
    travelled = pickle.loads(pickle.dumps(fetched))
    assert isinstance(travelled, MemorySource)
    # Then the store's disk is gone (another node): preprocessing still has everything it needs.
    for key in series.files:
        (files.root / key).unlink()
    prepared, _, _, node = _ray_preprocess(card_json, series, travelled, 0)
    assert node == ""  # outside Ray
    assert np.isfinite(prepared.image).all() and prepared.image.ndim == 3
    with pytest.raises(InvalidStudyError, match="cannot read"):
        _ray_preprocess(card_json, series, files, 0)  # the store itself has nothing any more


def test_keys_are_not_paths_and_a_path_source_reads_files(tmp_path: Path, registry) -> None:
    files, series, _ = _stored_series(tmp_path)
    pipeline_card = registry.get("ct-head-ich").card.model_dump(mode="json")
    assert not Path(series.files[0]).is_absolute() and not Path(series.files[0]).exists()
    from_store, *_ = _ray_preprocess(pipeline_card, series, files, 0)
    paths = SeriesInfo(series.series_uid, "CT", series.sop_class_uid, series.n_instances,
                       tuple(str(files.root / key) for key in series.files))  # fmt: skip
    from_paths, *_ = _ray_preprocess(pipeline_card, paths, PathSource(), 0)
    np.testing.assert_array_equal(from_store.image, from_paths.image)


def test_triage_infer_reads_a_folder_outside_the_store(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "xr", n=1, positive_fraction=1.0, seed=5, fmt="dicom")
    settings = Settings()
    settings.data_dir = tmp_path / "data"

    report = infer_path(tmp_path / "xr", settings)

    (study,) = report["studies"]
    (result,) = study["results"]
    assert result["ok"], result["error"]
    assert result["model"] == "xr-chest-pneumothorax" and result["findings"]
    assert not (tmp_path / "data" / "dicom").exists()  # nothing was copied into a store
