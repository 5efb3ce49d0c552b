"""Labelled datasets: labels.csv folders, the SIIM-ACR layout, stratified splits, and errors that name the problem."""

from __future__ import annotations

import numpy as np
import pytest

from triage.training.datasets import (
    DatasetError,
    LabelledCase,
    read_labels_csv,
    read_siim,
    series_in_folder,
    stratified_split,
)
from triage.training.synth_xray import make_chest_radiograph_dataset, siim_rle_decode, write_siim_layout


def test_siim_layout_labels_come_from_the_masks(tmp_path) -> None:
    rle_csv = write_siim_layout(tmp_path, 10, seed=3, size=64, positive_fraction=0.4)
    header = rle_csv.read_text().splitlines()[0]
    assert header == "ImageId, EncodedPixels"  # the public file's header, leading space included
    cases = read_siim(tmp_path)
    assert len(cases) == 10 and sum(c.label for c in cases) == 4
    for case in cases:
        assert case.path.parent.parent.parent.name == "dicom-images-train"
        assert case.path.stem == case.case_id
    positives = [line.split(",", 1) for line in rle_csv.read_text().splitlines()[1:] if not line.endswith("-1")]
    assert all(siim_rle_decode(rle, 64, 64).any() for _, rle in positives)


def test_siim_images_without_a_row_are_left_out(tmp_path) -> None:
    rle_csv = write_siim_layout(tmp_path, 6, seed=4, size=64)
    lines = rle_csv.read_text().splitlines()
    rle_csv.write_text("\n".join(lines[:-1]) + "\n")  # drop the last image's row
    assert len(read_siim(tmp_path)) == 5


def test_siim_without_rle_csv_is_named(tmp_path) -> None:
    with pytest.raises(DatasetError, match="train-rle.csv"):
        read_siim(tmp_path)


def test_labels_csv_accepts_files_and_study_folders(tmp_path) -> None:
    study = tmp_path / "study1"
    study.mkdir()
    make_chest_radiograph_dataset(1, True, (64, 64)).save_as(study / "a.dcm", enforce_file_format=True)
    make_chest_radiograph_dataset(2, False, (64, 64)).save_as(tmp_path / "b.dcm", enforce_file_format=True)
    (tmp_path / "labels.csv").write_text("image,label\nstudy1,1\nb.dcm,0\n")
    cases = read_labels_csv(tmp_path)
    assert [(c.case_id, c.label) for c in cases] == [("study1", 1), ("b.dcm", 0)]
    assert cases[0].files() == (str(study / "a.dcm"),)
    (series,) = series_in_folder(study)
    assert series.modality == "DX" and series.n_instances == 1 and series.attributes["ViewPosition"] == "PA"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,label\nx,1\n", "expected 'image' and 'label'"),
        ("image,label\nmissing.dcm,1\n", "'missing.dcm' does not exist"),
        ("image,label\nb.dcm,maybe\n", "label 'maybe' is not 0 or 1"),
        ("image,label\n", "lists no images"),
    ],
)
def test_bad_labels_csv_names_the_problem(tmp_path, content, message) -> None:
    (tmp_path / "b.dcm").write_bytes(b"")
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_labels_csv(tmp_path)


def test_stratified_split_keeps_the_positive_fraction(tmp_path) -> None:
    cases = [LabelledCase(str(i), tmp_path, int(i % 4 == 0)) for i in range(40)]
    train, val = stratified_split(cases, 0.25, seed=0)
    assert len(train) + len(val) == 40 and not {c.case_id for c in train} & {c.case_id for c in val}
    assert sum(c.label for c in val) == round(10 * 0.25)
    assert np.isclose(np.mean([c.label for c in train]), 0.25, atol=0.02)
    with pytest.raises(DatasetError, match="two cases of each label"):
        stratified_split(cases[1:4], 0.5, seed=0)
