"""Evaluate an installed model on labelled studies by running the service's own pipeline; write report, ROC, summary."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.dicom.series import read_series_attributes
from triage.domain import SeriesInfo
from triage.errors import TriageError
from triage.models.card import Figure, read_card, write_card
from triage.models.registry import InstalledModel
from triage.models.runtime import load_members
from triage.pipelines.base import pipeline_for
from triage.training import validation_report as vr
from triage.training.datasets import IMAGE_SUFFIXES, DatasetError, LabelledCase, read_labels_csv, series_in_folder

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
ROC_FILE = "roc.png"
CALIBRATION_FILE = "calibration.png"
HTML_FILE = "report.html"
SUMMARY_FILE = "summary.md"
PREDICTIONS_FILE = "predictions.csv"
FIGURE_PREFIX = "heldout_"


def evaluate(
    model: InstalledModel,
    data_dir: str | Path,
    labels_csv: str | Path | None,
    out_dir: str | Path,
    providers: Sequence[str],
    members: int = 0,
    n_bootstrap: int = 1000,
    seed: int = 0,
    *,
    command: str = "",
    site: str | None = None,
    prevalence: float | None = None,
    ray: RayBatch | None = None,
) -> dict[str, Any]:
    """Run preprocess -> infer (ONNX members) -> postprocess on every labelled case and measure the model.

    A case is a DICOM file, a PNG (radiograph models only) or a study folder; a folder's DICOM files are grouped
    per series and every series of a modality the card accepts is analysed; the case's score is the highest
    probability of the card's first finding over its series. A case whose analysis fails is counted and listed,
    and left out of the figures.

    Writes out_dir/report.json (ROC AUC, sensitivity, specificity, PPV and NPV at the site's prevalence at the
    card's threshold with 95% percentile bootstrap intervals, confusion matrix, n; operating points per target
    sensitivity; calibration; subgroups by manufacturer, scanner, site, view, slice thickness and age band; the
    worst errors), out_dir/report.html (with roc.png, calibration.png and gallery/ thumbnails), out_dir/summary.md
    and out_dir/predictions.csv.

    Args:
        model: the installed model (card + weights folder).
        data_dir: the folder the CSV's image paths are relative to.
        labels_csv: CSV with columns image, label (default data_dir/labels.csv).
        out_dir: output folder (created).
        providers: ONNX Runtime providers in preference order.
        members: ensemble members to run (0: the card's default for the device).
        n_bootstrap: bootstrap resamples for the confidence intervals.
        seed: seed of the bootstrap.
        command: the command line that ran this, recorded in the report.
        site: the site (institution) whose studies these are: a report for a site is what activating the model
            there rests on (`triage models promote`). None: not a site's validation.
        prevalence: the site's prevalence of the finding, for PPV and NPV (default: the labelled set's).
        ray: score the cases with Ray Data on this cluster (thousands of studies) instead of in this process.

    Returns:
        The report dictionary.

    Raises:
        DatasetError: for an unusable labels file, or when no case could be analysed.
        ModelLoadError: when the model's weights fail their sha256 check or cannot be loaded.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = model.card
    label = card.findings[0].label
    threshold = float(card.findings[0].threshold)
    cases = read_labels_csv(data_dir, labels_csv)
    pipeline = pipeline_for(card)
    # On Ray the actors load their own sessions; here one is loaded for the report's provider list either way.
    sessions = load_members(model, providers, members)

    case_ids: list[str] = []
    truths: list[int] = []
    scores: list[float] = []
    headers: list[dict[str, Any]] = []
    paths: dict[str, Path] = {}
    failures: list[dict[str, str]] = []
    for case, probability, error in _scored(cases, model, pipeline, sessions, providers, members, ray):
        if probability is None:
            failures.append({"case": case.case_id, "error": error})
            log.warning("case %s not analysed: %s", case.case_id, error)
            continue
        case_ids.append(case.case_id)
        truths.append(case.label)
        scores.append(probability)
        headers.append(case_attributes(case.path))
        paths[case.case_id] = case.path
    if not scores:
        raise DatasetError(f"none of the {len(cases)} cases could be analysed; first error: {failures[0]['error']}")

    y = np.asarray(truths, dtype=int)
    p = np.asarray(scores, dtype=float)
    metrics = binary_metrics(y, p, threshold)
    intervals = bootstrap_intervals(y, p, threshold, n_bootstrap, seed)
    report: dict[str, Any] = {
        "model": card.name,
        "version": card.version,
        "synthetic": card.synthetic,
        "notice": card.notice if card.synthetic else "",
        "site": site,
        "finding": label,
        "threshold": threshold,
        "data": {"folder": str(data_dir), "labels": str(labels_csv or Path(data_dir) / "labels.csv")},
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
        "n_failed": len(failures),
        "failures": failures[:50],
        "roc_auc": metrics["roc_auc"],
        "roc_auc_ci95": intervals["roc_auc"],
        "sensitivity": metrics["sensitivity"],
        "sensitivity_ci95": intervals["sensitivity"],
        "specificity": metrics["specificity"],
        "specificity_ci95": intervals["specificity"],
        "confusion_matrix": metrics["confusion_matrix"],
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "method": "percentile, cases resampled"},
        **_site_figures(case_ids, y, p, threshold, headers, prevalence, n_bootstrap, seed),
        "providers": list(sessions[0].providers) if sessions else [],
        "members": len(sessions),
        "scored_with": f"Ray Data ({ray.concurrency} actor(s), cluster {ray.address or 'local'})"
        if ray
        else "in process",
        "seconds": round(time.perf_counter() - started, 1),
        "command": command,
    }
    for index, row in enumerate(report["worst_errors"]):
        name = f"gallery/{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', row['case'])[:60]}.png"
        row["thumbnail"] = name if vr.thumbnail(paths[row["case"]], out / name) else None
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    _write_predictions(out / PREDICTIONS_FILE, case_ids, y, p, threshold)
    _plot_roc(out / ROC_FILE, y, p, report)
    vr.plot_calibration(out / CALIBRATION_FILE, report["calibration"], f"{card.name} {card.version} (n={len(y)})")
    vr.write_html(out / HTML_FILE, report)
    (out / SUMMARY_FILE).write_text(_summary_markdown(report))
    return report


def case_attributes(path: Path) -> dict[str, Any]:
    """The header attributes subgroups are drawn from (manufacturer, scanner, site, view, thickness, age), read from
    the first DICOM file of a case; empty for a PNG or an unreadable case."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.suffix.lower() in IMAGE_SUFFIXES:
            return {}
        try:
            return read_series_attributes(file)
        except TriageError:
            continue
    return {}


def _site_figures(
    case_ids: list[str],
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    headers: list[dict[str, Any]],
    prevalence: float | None,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """PPV/NPV at the prevalence, operating points, calibration, subgroups and the worst errors."""
    if prevalence is not None and not 0.0 < prevalence < 1.0:
        raise DatasetError(f"prevalence {prevalence!r} must be between 0 and 1 (exclusive)")
    used = float(prevalence) if prevalence is not None else float(y.mean())
    se, sp = vr.se_sp(y, p, threshold)
    ppv, npv = vr.predictive_values(se, sp, used)
    at_card = vr.bootstrap_at(y, p, threshold, used, n_bootstrap, seed)
    return {
        "prevalence": used,
        "prevalence_source": "given for the site" if prevalence is not None else "the labelled set's",
        "ppv": ppv,
        "ppv_ci95": at_card["ppv"],
        "npv": npv,
        "npv_ci95": at_card["npv"],
        "flag_rate": float(np.mean(p >= threshold)),
        "operating_points": vr.operating_points(y, p, used, n_bootstrap, seed, [("card threshold", threshold)]),
        "calibration": vr.calibration(y, p),
        "subgroups": vr.subgroups(y, p, headers, threshold, min(n_bootstrap, vr.SUBGROUP_BOOTSTRAP), seed),
        "worst_errors": vr.worst_errors(case_ids, y, p, threshold),
    }


@dataclass(frozen=True)
class RayBatch:
    """Where and how wide to run a Ray Data evaluation: `address` None starts a local Ray instance."""

    address: str | None = None
    concurrency: int = 1


def _scored(
    cases: Sequence[LabelledCase],
    model: InstalledModel,
    pipeline: Any,
    sessions: list[Any],
    providers: Sequence[str],
    members: int,
    ray: RayBatch | None,
) -> Iterator[tuple[LabelledCase, float | None, str]]:
    """Each case with its probability (None when it could not be analysed) and the error, in order."""
    if ray is not None:
        from triage.training.ray_batch import score_on_ray

        results = score_on_ray(model, cases, providers, members, ray.address, ray.concurrency)
        yield from ((case, probability, error) for case, (_, probability, error) in zip(cases, results, strict=True))
        return
    label = model.card.findings[0].label
    for case in cases:
        try:
            yield case, score_case(case, pipeline, sessions, model.card.inputs.modality, label), ""
        except TriageError as exc:
            yield case, None, str(exc)


def score_case(case: LabelledCase, pipeline: Any, sessions: list[Any], modalities: Sequence[str], label: str) -> float:
    series = _case_series(case, modalities)
    probabilities: list[float] = []
    for one in series:
        prepared = pipeline.preprocess(one)
        raw = pipeline.infer(prepared, sessions)
        findings = pipeline.postprocess(prepared, raw, one)
        probabilities += [f.probability for f in findings if f.label == label]
    if not probabilities:
        raise DatasetError(f"case {case.case_id!r}: the model reported no {label!r} finding")
    return float(max(probabilities))


def _case_series(case: LabelledCase, modalities: Sequence[str]) -> list[SeriesInfo]:
    """The series of a case that the model should read: a file is one series; a folder is grouped by series."""
    path = case.path
    if path.is_dir():
        found = series_in_folder(path)
        if not found:
            raise DatasetError(f"case {case.case_id!r}: the folder holds no DICOM or PNG images")
        accepted = [s for s in found if s.modality in modalities]
        return accepted or found
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [SeriesInfo(path.stem, "OT", "", 1, (str(path),), {"format": "png"})]
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise DatasetError(f"case {case.case_id!r}: {path.name} is neither DICOM nor PNG ({exc})") from exc
    return [
        SeriesInfo(
            str(ds.get("SeriesInstanceUID", path.stem)),
            str(ds.get("Modality", "")),
            str(ds.get("SOPClassUID", "")),
            1,
            (str(path),),
        )
    ]


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """ROC AUC, and sensitivity, specificity and the confusion matrix at `threshold` (flag when p >= threshold)."""
    from sklearn.metrics import roc_auc_score

    flagged = p >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    fn = int(np.sum(~flagged & (y == 1)))
    tn = int(np.sum(~flagged & (y == 0)))
    fp = int(np.sum(flagged & (y == 0)))
    return {
        "roc_auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "confusion_matrix": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
    }


def bootstrap_intervals(
    y: np.ndarray, p: np.ndarray, threshold: float, n_bootstrap: int, seed: int
) -> dict[str, list[float] | None]:
    """95% percentile bootstrap intervals of ROC AUC, sensitivity and specificity (cases resampled)."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"roc_auc": [], "sensitivity": [], "specificity": []}
    for _ in range(max(0, n_bootstrap)):
        index = rng.integers(0, len(y), len(y))
        metrics = binary_metrics(y[index], p[index], threshold)
        for key in samples:
            if metrics[key] is not None:
                samples[key].append(float(metrics[key]))
    return {
        key: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 10 else None
        for key, v in samples.items()
    }


def record_evaluation(model: InstalledModel, report: dict[str, Any], measured_on: str = "") -> Path:
    """Write a report's figures into the model's card.json (replacing earlier held-out figures).

    The weights' sha256 is unchanged: the card's text changes, the weights do not.

    Returns:
        The card path.
    """
    card_path = model.directory / "card.json"
    card = read_card(card_path)
    where = measured_on or f"{report['n']} held-out cases from {report['data']['folder']}"
    source = report.get("command") or "triage.training.evaluate.evaluate"

    def interval(key: str) -> str:
        ci = report.get(f"{key}_ci95")
        return f"; 95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""

    figures = [f for f in card.figures if not f.name.startswith(FIGURE_PREFIX)]
    for key in ("roc_auc", "sensitivity", "specificity"):
        if report.get(key) is not None:
            figures.append(
                Figure(
                    name=f"{FIGURE_PREFIX}{key}",
                    value=round(float(report[key]), 4),
                    measured_on=f"{where}{interval(key)}"
                    + (f"; threshold {report['threshold']}" if key != "roc_auc" else ""),
                    source=source,
                )
            )
    cm = report["confusion_matrix"]
    figures.append(
        Figure(
            name=f"{FIGURE_PREFIX}confusion_matrix",
            value=f"TP {cm['tp']}, FN {cm['fn']}, TN {cm['tn']}, FP {cm['fp']}",
            measured_on=where,
            source=source,
        )
    )
    card.figures = figures
    card.evaluation_data = (
        f"{report['n']} held-out cases ({report['n_positive']} positive) from {report['data']['folder']}"
        + (", synthetic radiographs generated with a different seed from the training set" if card.synthetic else "")
        + f"; run through the service pipeline with {report['providers']}; command: {source}"
    )
    write_card(card, card_path)
    return card_path


def _write_predictions(path: Path, case_ids: list[str], y: np.ndarray, p: np.ndarray, threshold: float) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "probability", "flagged"])
        for case_id, truth, probability in zip(case_ids, y, p, strict=True):
            writer.writerow([case_id, int(truth), f"{probability:.6f}", int(probability >= threshold)])


def _plot_roc(path: Path, y: np.ndarray, p: np.ndarray, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if report["roc_auc"] is not None:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"ROC AUC {report['roc_auc']:.3f}")
    if report["sensitivity"] is not None and report["specificity"] is not None:
        ax.plot(
            [1 - report["specificity"]],
            [report["sensitivity"]],
            "o",
            label=f"threshold {report['threshold']:.3f}",
        )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    title = f"{report['model']} {report['version']} (n={report['n']})"
    if report["synthetic"]:
        title += "\nSYNTHETIC demonstration model, not validated"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _summary_markdown(report: dict[str, Any]) -> str:
    cm = report["confusion_matrix"]
    lines = [f"# Evaluation of {report['model']} {report['version']}", ""]
    if report["synthetic"]:
        lines += [
            "**Synthetic demonstration model, not validated.** These figures were measured on synthetic radiographs "
            "and say nothing about real chest X-rays.",
            "",
        ]
    lines += [
        f"Cases: {report['n']} ({report['n_positive']} positive, {report['n_negative']} negative); "
        f"not analysed: {report['n_failed']}.",
        f"Threshold for `{report['finding']}`: {report['threshold']}. Providers: {', '.join(report['providers'])}; "
        f"members: {report['members']}.",
        "",
        "| figure | value (95% CI) |",
        "|---|---|",
        f"| ROC AUC | {_fmt(report['roc_auc'], report['roc_auc_ci95'])} |",
        f"| sensitivity | {_fmt(report['sensitivity'], report['sensitivity_ci95'])} |",
        f"| specificity | {_fmt(report['specificity'], report['specificity_ci95'])} |",
        "",
        "| | flagged | not flagged |",
        "|---|---|---|",
        f"| positive | {cm['tp']} (TP) | {cm['fn']} (FN) |",
        f"| negative | {cm['fp']} (FP) | {cm['tn']} (TN) |",
        "",
        f"Intervals: {report['bootstrap']['resamples']} bootstrap resamples of cases "
        f"(seed {report['bootstrap']['seed']}), percentile method.",
    ]
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"
