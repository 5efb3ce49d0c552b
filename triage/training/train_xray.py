"""Train the chest radiograph pneumothorax classifier on CPU from a labelled folder or the SIIM-ACR layout."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from triage.models.xray_net import build_xray_net, heatmap_stride, network_params
from triage.pipelines.radiograph import RadiographPreprocess, prepare_files, preprocessing_params
from triage.training.datasets import (
    DatasetError,
    LabelledCase,
    prepare_cases,
    read_labels_csv,
    read_siim,
    stratified_split,
)

log = logging.getLogger(__name__)

MODEL_NAME = "xr-chest-pneumothorax"
CHECKPOINT_FILE = "model.pt"
TRAINING_RECORD = "training.json"
# The shipped model's network: small enough to train in minutes on two CPU cores.
SHIPPED_NETWORK: dict[str, Any] = {
    "init_features": 16,
    "growth_rate": 8,
    "block_config": [3, 4, 6],
    "bn_size": 2,
    "pooling": "mean",
}


def train(
    data_dir: str | Path,
    labels_csv: str | Path | None,
    out_dir: str | Path,
    epochs: int = 10,
    *,
    siim: bool = False,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    val_fraction: float = 0.2,
    seed: int = 0,
    augment: bool = True,
    preprocessing: Mapping[str, Any] | None = None,
    network: Mapping[str, Any] | None = None,
    data_description: str = "",
    target_sensitivity: float = 0.9,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train from scratch and write out_dir/model.pt (state dict) and out_dir/training.json.

    Images go through the service's own preprocessing (`RadiographPreprocess` with the parameters that the
    exported card will carry); training adds light MONAI augmentation (small affine, contrast, noise).
    The checkpoint kept is the epoch with the best validation ROC AUC.

    Args:
        data_dir: a folder of DICOM/PNG images (with labels_csv) or, with siim=True, the SIIM-ACR layout.
        labels_csv: CSV with columns image, label (default data_dir/labels.csv); ignored when siim=True.
        out_dir: where model.pt and training.json are written.
        epochs: passes over the training split.
        siim: read the SIIM-ACR layout (DICOM + train-rle.csv; label = any mask).
        batch_size: images per step.
        learning_rate: peak learning rate of the one-cycle schedule (AdamW).
        val_fraction: stratified validation fraction.
        seed: seeds the split, the initial weights and the augmentation.
        augment: apply training augmentation.
        preprocessing: card preprocessing overrides (default: the pipeline's defaults).
        network: network parameter overrides (default: SHIPPED_NETWORK).
        data_description: words for the card about where the data came from.
        target_sensitivity: the operating threshold written for the card is the highest validation-set threshold
            that reaches this sensitivity (triage prefers a missed flag to be rare).
        progress: called with one line per epoch (e.g. print).

    Returns:
        The training record (also written as training.json).

    Raises:
        DatasetError: for unusable data (missing files, one class only, unreadable images).
    """
    import torch
    from monai.utils import set_determinism

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = read_siim(data_dir) if siim else read_labels_csv(data_dir, labels_csv)
    train_cases, val_cases = stratified_split(cases, val_fraction, seed)
    prep_params = preprocessing_params(preprocessing)
    net_params = network_params({**SHIPPED_NETWORK, **(network or {})})
    transform = RadiographPreprocess(prep_params)

    def prepare(files: Any) -> Any:
        return prepare_files(transform, files)

    x_train, y_train = prepare_cases(train_cases, prepare)
    x_val, y_val = prepare_cases(val_cases, prepare)
    prepared_s = time.perf_counter() - started
    _say(progress, f"prepared {len(x_train)} training and {len(x_val)} validation images in {prepared_s:.1f} s")

    set_determinism(seed=seed)
    torch.manual_seed(seed)
    model = build_xray_net(net_params)
    augmentation = _augmentation(seed) if augment else None
    steps_per_epoch = max(1, int(np.ceil(len(x_train) / batch_size)))
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=learning_rate, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.2
    )
    positives = float(y_train.sum())
    pos_weight = torch.tensor([(len(y_train) - positives) / max(positives, 1.0)])
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    rng = np.random.default_rng(seed)
    history: list[dict[str, float]] = []
    best_auc, best_state, best_epoch, best_threshold = -1.0, None, 0, 0.5
    for epoch in range(1, epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        order = rng.permutation(len(x_train))
        losses: list[float] = []
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = x_train[index]
            if augmentation is not None:
                batch = augmentation(batch)
            logits, _ = model(torch.from_numpy(batch))
            loss = loss_fn(logits.reshape(-1), torch.from_numpy(y_train[index]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        val_probabilities, val_loss = _predict(model, x_val, y_val, loss_fn, batch_size)
        auc = _roc_auc(y_val, val_probabilities)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_roc_auc": auc,
            "seconds": time.perf_counter() - epoch_started,
        }
        history.append(record)
        _say(
            progress,
            f"epoch {epoch}/{epochs}: train loss {record['train_loss']:.4f}, val loss {val_loss:.4f}, "
            f"val ROC AUC {auc:.4f} ({record['seconds']:.0f} s)",
        )
        if auc > best_auc:
            best_auc, best_epoch = auc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_threshold = operating_threshold(y_val, val_probabilities, target_sensitivity)
    assert best_state is not None  # epochs >= 1 is checked by the loop having run
    torch.save(best_state, out / CHECKPOINT_FILE)
    positives_all = sum(c.label for c in cases)
    result: dict[str, Any] = {
        "model": MODEL_NAME,
        "network": net_params,
        "heatmap_stride": heatmap_stride(net_params),
        "preprocessing": prep_params,
        "data": {
            "source": str(data_dir),
            "layout": "siim-acr" if siim else "labels-csv",
            "description": data_description,
            "n_images": len(cases),
            "n_positive": positives_all,
            "n_train": len(train_cases),
            "n_val": len(val_cases),
        },
        "hyperparameters": {
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "optimiser": "AdamW, one-cycle schedule, weight decay 1e-4",
            "loss": "BCE with logits, positive class weighted by the negative/positive ratio",
            "val_fraction": val_fraction,
            "seed": seed,
            "augment": augment,
            "torch_threads": torch.get_num_threads(),
        },
        "history": history,
        "best_epoch": best_epoch,
        "best_val_roc_auc": best_auc,
        "operating_threshold": best_threshold,
        "operating_point": f"highest threshold with validation sensitivity >= {target_sensitivity}",
        "training_seconds": time.perf_counter() - started,
        "torch_version": torch.__version__,
    }
    (out / TRAINING_RECORD).write_text(json.dumps(result, indent=2) + "\n")
    return result


class _BatchAugmentation:
    """Light, cheap augmentation of a normalised batch (N, 1, H, W): a per-image shift of up to `margin` px
    (edge-padded), then MONAI's random tone curve and Gaussian noise over the batch. Cheap on purpose: the
    shipped model trains on two CPU cores."""

    def __init__(self, seed: int, margin: int = 16) -> None:
        from monai.transforms import RandAdjustContrast, RandGaussianNoise

        self.margin = margin
        self.rng = np.random.default_rng(seed)
        self.contrast = RandAdjustContrast(prob=0.5, gamma=(0.8, 1.25))
        self.noise = RandGaussianNoise(prob=0.5, std=0.05)
        self.contrast.set_random_state(seed=seed)
        self.noise.set_random_state(seed=seed + 1)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n, _, rows, cols = batch.shape
        m = self.margin
        padded = np.pad(batch, ((0, 0), (0, 0), (m, m), (m, m)), mode="edge")
        offsets = self.rng.integers(0, 2 * m + 1, (n, 2))
        shifted = np.stack([padded[i, :, r : r + rows, c : c + cols] for i, (r, c) in enumerate(offsets)])
        # MONAI array transforms take (C, H, W): the batch's images stand in as channels.
        flat = shifted.reshape(n, rows, cols)
        flat = np.asarray(self.noise(self.contrast(flat)), dtype=np.float32)
        return flat.reshape(n, 1, rows, cols)


def _augmentation(seed: int) -> _BatchAugmentation:
    return _BatchAugmentation(seed)


def _predict(
    model: Any, images: np.ndarray, labels: np.ndarray, loss_fn: Any, batch_size: int
) -> tuple[np.ndarray, float]:
    import torch

    model.eval()
    logits: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out, _ = model(torch.from_numpy(images[start : start + batch_size]))
            logits.append(out.reshape(-1).numpy())
        all_logits = np.concatenate(logits)
        loss = float(loss_fn(torch.from_numpy(all_logits), torch.from_numpy(labels)))
    return 1.0 / (1.0 + np.exp(-all_logits)), loss


def operating_threshold(labels: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold t with sensitivity (scores >= t among positives) >= target_sensitivity."""
    positives = np.sort(scores[labels > 0.5])[::-1]
    if positives.size == 0:
        return 0.5
    needed = int(np.ceil(target_sensitivity * positives.size))
    return float(positives[max(needed, 1) - 1])


def _roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _say(progress: Callable[[str], None] | None, line: str) -> None:
    log.info("%s", line)
    if progress is not None:
        progress(line)


__all__ = ["train", "DatasetError", "LabelledCase", "SHIPPED_NETWORK", "MODEL_NAME"]
