"""Export a trained chest radiograph checkpoint to ONNX, check parity with torch, and write its model card."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from triage.config import REPO_ROOT
from triage.errors import ModelLoadError
from triage.models.card import (
    CardInputs,
    CardOutputs,
    Figure,
    FindingSpec,
    ModelCard,
    TensorSpec,
    WeightsFile,
    write_card,
)
from triage.models.intended_use import IntendedUse, Range
from triage.models.registry import sha256_file
from triage.models.xray_net import build_xray_net, heatmap_stride, network_params
from triage.pipelines.radiograph import SYNTHETIC_NOTICE, RadiographPreprocess, prepare_files
from triage.training.synth_xray import GENERATOR_NAME, GENERATOR_VERSION, make_chest_radiograph_dataset
from triage.training.train_xray import CHECKPOINT_FILE, MODEL_NAME, TRAINING_RECORD

ONNX_FILE = "model.onnx"
OPSET = 18
# Largest |torch - onnxruntime| accepted on the same preprocessed radiograph (float32 on CPU).
PARITY_TOLERANCE = {"logit": 1e-4, "heatmap": 1e-4}
PIPELINE_NAME = "xr-chest-classifier"


def export(
    checkpoint_dir: str | Path,
    weights_dir: str | Path = REPO_ROOT / "weights",
    version: str = "1.0.0",
    *,
    synthetic: bool = True,
    training_command: str = "",
) -> Path:
    """Write weights/<name>/<version>/{model.onnx, model.pt, training.json, card.json} from a training run.

    The ONNX graph has input "image" (N, 1, H, W) and outputs "logit" (N, 1) and "heatmap" (N, 1, h, w).
    Parity between torch and onnxruntime is measured on a generated radiograph passed through the service's
    preprocessing and recorded in the card; export fails if it exceeds PARITY_TOLERANCE.

    Args:
        checkpoint_dir: the training output (model.pt + training.json).
        weights_dir: the registry's weights folder.
        version: the model version to write.
        synthetic: whether the training data were synthetic (it is written into the card and every finding).
        training_command: the command that trained it, for the card's provenance.

    Returns:
        The path of the written card.json.

    Raises:
        ModelLoadError: when the checkpoint is missing or parity fails.
    """
    import torch

    source = Path(checkpoint_dir)
    record_path, state_path = source / TRAINING_RECORD, source / CHECKPOINT_FILE
    if not record_path.is_file() or not state_path.is_file():
        raise ModelLoadError(f"{source}: expected {TRAINING_RECORD} and {CHECKPOINT_FILE} from a training run")
    record = json.loads(record_path.read_text())
    record["network"] = network_params(record["network"])  # every parameter explicit in the card
    net = build_xray_net(record["network"])
    net.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    net.eval()

    target = Path(weights_dir) / MODEL_NAME / version
    target.mkdir(parents=True, exist_ok=True)
    rows, cols = record["preprocessing"]["image_size"]
    onnx_path = target / ONNX_FILE
    _export_onnx(net, (rows, cols), onnx_path)
    if state_path.resolve() != (target / CHECKPOINT_FILE).resolve():
        shutil.copyfile(state_path, target / CHECKPOINT_FILE)
    if record_path.resolve() != (target / TRAINING_RECORD).resolve():
        shutil.copyfile(record_path, target / TRAINING_RECORD)

    parity = measure_parity(net, onnx_path, record["preprocessing"])
    for key, limit in PARITY_TOLERANCE.items():
        if parity[f"max_abs_diff_{key}"] > limit:
            raise ModelLoadError(
                f"ONNX parity failed: max |torch - onnxruntime| of {key} is {parity[f'max_abs_diff_{key}']:.3g} "
                f"> tolerance {limit:g}"
            )
    card = _card(record, version, onnx_path, target / CHECKPOINT_FILE, parity, synthetic, training_command)
    card_path = target / "card.json"
    write_card(card, card_path)
    return card_path


def _export_onnx(net: Any, image_size: tuple[int, int], path: Path) -> None:
    import torch

    example = torch.zeros(1, 1, *image_size, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.onnx.export(
        net,
        (example,),
        input_names=["image"],
        output_names=["logit", "heatmap"],
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if program is None:  # only the legacy exporter returns nothing
        raise ModelLoadError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    import onnx

    onnx.checker.check_model(str(path))


def parity_input(preprocessing: dict[str, Any], seed: int = 20240601) -> np.ndarray:
    """A real model input: a generated positive radiograph (MONOCHROME1, rescaled, windowed DX) written as DICOM,
    read back and preprocessed exactly as the service does. Shape (1, 1, H, W)."""
    ds = make_chest_radiograph_dataset(
        seed, True, (300, 260), photometric="MONOCHROME1", rescale=(2.0, -100.0), sop_class="DX"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "parity.dcm"
        ds.save_as(path, enforce_file_format=True)
        prepared = prepare_files(RadiographPreprocess(preprocessing), [str(path)])
    return prepared.image[None].astype(np.float32)


def measure_parity(net: Any, onnx_path: Path, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """Largest absolute torch-vs-onnxruntime differences (CPU execution provider) on `parity_input`."""
    import onnxruntime as ort
    import torch

    batch = parity_input(preprocessing)
    with torch.no_grad():
        logit_t, heatmap_t = (t.numpy() for t in net(torch.from_numpy(batch)))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logit_o, heatmap_o = session.run(["logit", "heatmap"], {"image": batch})
    return {
        "max_abs_diff_logit": float(np.max(np.abs(logit_t - logit_o))),
        "max_abs_diff_heatmap": float(np.max(np.abs(heatmap_t - heatmap_o))),
        "tolerance": PARITY_TOLERANCE,
        "input": "generated positive DX radiograph 300x260, MONOCHROME1, Rescale 2/-100, read and preprocessed "
        "by the service's pipeline",
        "providers": ["CPUExecutionProvider"],
        "torch_logit": float(logit_t.reshape(-1)[0]),
    }


def _pooling_words(network: dict[str, Any]) -> str:
    if network.get("pooling") == "lse":
        return f"log-sum-exp smooth maximum (r={network['lse_r']})"
    return "spatial mean"


def _card(
    record: dict[str, Any],
    version: str,
    onnx_path: Path,
    torch_path: Path,
    parity: dict[str, Any],
    synthetic: bool,
    training_command: str,
) -> ModelCard:
    rows, cols = record["preprocessing"]["image_size"]
    stride = heatmap_stride(record["network"])
    data = record["data"]
    hyper = record["hyperparameters"]
    training_text = (
        f"{data['n_images']} {'synthetic ' if synthetic else ''}radiographs ({data['n_positive']} with pneumothorax) "
        f"from {data['description'] or data['source']}; stratified split {data['n_train']} train / "
        f"{data['n_val']} validation (seed {hyper['seed']}); {hyper['epochs']} epochs on CPU "
        f"({record['training_seconds']:.0f} s wall-clock, {hyper['torch_threads']} torch threads)."
    )
    figures = [
        Figure(
            name="validation_roc_auc",
            value=round(float(record["best_val_roc_auc"]), 4),
            measured_on=f"{data['n_val']} validation images of the training split (epoch {record['best_epoch']})",
            source=training_command or "triage.training.train_xray.train",
        ),
        Figure(
            name="training_time",
            value=round(float(record["training_seconds"]), 1),
            unit="s",
            measured_on=f"CPU, {hyper['torch_threads']} torch threads, {data['n_train']} training images",
            source=training_command or "triage.training.train_xray.train",
        ),
        Figure(
            name="onnx_parity_max_abs_diff_logit",
            value=float(f"{parity['max_abs_diff_logit']:.3g}"),
            measured_on=parity["input"],
            source="triage models export xr-chest-pneumothorax",
        ),
        Figure(
            name="onnx_parity_max_abs_diff_heatmap",
            value=float(f"{parity['max_abs_diff_heatmap']:.3g}"),
            measured_on=parity["input"],
            source="triage models export xr-chest-pneumothorax",
        ),
    ]
    summary = (
        "SYNTHETIC DEMONSTRATION MODEL: flags pneumothorax on frontal chest radiographs; trained only on synthetic "
        "images generated by this repository, not validated, not for clinical use."
        if synthetic
        else "Flags pneumothorax on frontal chest radiographs."
    )
    return ModelCard(
        name=MODEL_NAME,
        version=version,
        task="binary classification of a frontal chest radiograph (pneumothorax present) with a coarse heatmap",
        pipeline=PIPELINE_NAME,
        summary=summary,
        synthetic=synthetic,
        intended_use=(
            "Demonstrating and testing the triage service end to end (DICOM in, finding and heatmap out, worklist "
            "reprioritised). Not for diagnosis or clinical triage: it has never seen a real radiograph."
            if synthetic
            else "Research use in worklist prioritisation; not a diagnostic device."
        ),
        inputs=CardInputs(
            modality=["CR", "DX"],
            body_part=["CHEST", "THORAX", "LUNG"],
            # What every version of this model kind is made for: frontal adult chest films (checked per series).
            intended_use=IntendedUse(views=["PA", "AP"], age_years=Range(min=18), age_words="adults (18 y and over)"),
            tensor=TensorSpec(name="image", shape=[None, 1, rows, cols]),
            preprocessing=record["preprocessing"],
        ),
        outputs=CardOutputs(tensor=TensorSpec(name="logit", shape=[None, 1]), labels=["pneumothorax"]),
        findings=[
            FindingSpec(
                label="pneumothorax",
                threshold=round(float(record["operating_threshold"]), 4),
                description="Air in the pleural space: a visceral pleural line with absent lung markings beyond it.",
                probability_method=(
                    f"sigmoid of the logit; the logit is the {_pooling_words(record['network'])} of the class "
                    f"activation map (output 'heatmap'); threshold: {record['operating_point']}"
                ),
            )
        ],
        weights=[WeightsFile(file=ONNX_FILE, sha256=sha256_file(onnx_path))],
        postprocessing={
            "heatmap_output": "heatmap",
            "heatmap_shape": [None, 1, rows // stride, cols // stride],
            "heatmap_stride": stride,
            "overlay_max_px": 256,
        },
        training_data=training_text,
        evaluation_data="not evaluated yet: run `triage models evaluate` (figures are added to this card)",
        figures=figures,
        limitations=[
            "Trained and evaluated only on synthetic radiographs from triage.training.synth_xray; its figures say "
            "nothing about real chest X-rays."
            if synthetic
            else "See evaluation_data.",
            "Frontal (PA/AP) views only; lateral views, children, and images with lines and tubes were never seen.",
            "The heatmap is a class activation map at 1/16 of the input resolution: a coarse pointer, not a "
            "segmentation.",
        ],
        licence="Apache-2.0 (weights trained in this repository)",
        provenance={
            "network": record["network"],
            "framework": f"MONAI DenseNet features, torch {record.get('torch_version', '')}",
            "onnx": {"file": ONNX_FILE, "opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)"},
            "torch_weights": {"file": CHECKPOINT_FILE, "sha256": sha256_file(torch_path)},
            "training_record": TRAINING_RECORD,
            "training_command": training_command,
            "parity": parity,
            "data_generator": f"{GENERATOR_NAME} v{GENERATOR_VERSION}" if synthetic else "",
            "hyperparameters": hyper,
        },
        notice=SYNTHETIC_NOTICE if synthetic else "",
    )
