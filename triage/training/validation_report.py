"""The figures of a local validation beyond AUC/Se/Sp: predictive values at the site's prevalence, operating
points per target sensitivity, calibration, subgroups with intervals, the worst errors, and the HTML report.

Pure numpy for the figures (a golden test checks them by hand); matplotlib for the plots; Jinja2 for the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.worklist.monitoring import age_band, thickness_band

# Sensitivities a site commonly wants to hold, and the operating point the report lists for each.
TARGET_SENSITIVITIES = (0.80, 0.90, 0.95, 0.98)
CALIBRATION_BINS = 10
SUBGROUP_BOOTSTRAP = 300
GALLERY_PER_KIND = 8


def se_sp(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity when flagging p >= threshold (None where a class is absent)."""
    flagged = p >= threshold
    positives, negatives = y == 1, y == 0
    se = float(np.mean(flagged[positives])) if positives.any() else None
    sp = float(np.mean(~flagged[negatives])) if negatives.any() else None
    return se, sp


def predictive_values(se: float | None, sp: float | None, prevalence: float) -> tuple[float | None, float | None]:
    """PPV and NPV at a prevalence (Bayes: a site's case mix, not the validation set's)."""
    if se is None or sp is None:
        return None, None
    tp, fp = se * prevalence, (1 - sp) * (1 - prevalence)
    tn, fn = sp * (1 - prevalence), (1 - se) * prevalence
    return (tp / (tp + fp) if tp + fp else None), (tn / (tn + fn) if tn + fn else None)


def _interval(values: list[float]) -> list[float] | None:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) >= 10 else None


def bootstrap_at(
    y: np.ndarray, p: np.ndarray, threshold: float, prevalence: float, n_bootstrap: int, seed: int
) -> dict[str, list[float] | None]:
    """95% percentile intervals of Se, Sp, PPV and NPV at one threshold (cases resampled)."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"sensitivity": [], "specificity": [], "ppv": [], "npv": []}
    for _ in range(max(0, n_bootstrap)):
        index = rng.integers(0, len(y), len(y))
        se, sp = se_sp(y[index], p[index], threshold)
        ppv, npv = predictive_values(se, sp, prevalence)
        for key, value in (("sensitivity", se), ("specificity", sp), ("ppv", ppv), ("npv", npv)):
            if value is not None:
                samples[key].append(value)
    return {key: _interval(values) for key, values in samples.items()}


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float | None:
    """The highest threshold whose sensitivity is at least `target` (None without positives)."""
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        return None
    # Flagging the k highest-scoring positives needs threshold <= their k-th score; the least k meeting target.
    k = max(1, math.ceil(target * positives.size - 1e-9))
    return float(positives[k - 1])


def operating_points(
    y: np.ndarray,
    p: np.ndarray,
    prevalence: float,
    n_bootstrap: int,
    seed: int,
    thresholds: Sequence[tuple[str, float]] = (),
) -> list[dict[str, Any]]:
    """One row per operating point: the card's (and any named) threshold, and the highest threshold holding each
    target sensitivity, with Se, Sp, PPV, NPV and their 95% intervals."""
    rows: list[tuple[str, float, float | None]] = [(name, float(t), None) for name, t in thresholds]
    for goal in TARGET_SENSITIVITIES:
        found = threshold_for_sensitivity(y, p, goal)
        if found is not None:
            rows.append((f"sensitivity >= {goal:.2f}", found, goal))
    table = []
    for name, threshold, target in rows:
        se, sp = se_sp(y, p, threshold)
        ppv, npv = predictive_values(se, sp, prevalence)
        ci = bootstrap_at(y, p, threshold, prevalence, n_bootstrap, seed)
        table.append(
            {
                "name": name,
                "target_sensitivity": target,
                # Not rounded: a "sensitivity >= x" threshold is a positive case's exact score, and rounding it up
                # would lose that case at the stored operating point.
                "threshold": threshold,
                "sensitivity": se,
                "sensitivity_ci95": ci["sensitivity"],
                "specificity": sp,
                "specificity_ci95": ci["specificity"],
                "ppv": ppv,
                "ppv_ci95": ci["ppv"],
                "npv": npv,
                "npv_ci95": ci["npv"],
                "flag_rate": float(np.mean(p >= threshold)),
                "confusion_matrix": _counts(y, p, threshold),
            }
        )
    return table


def _counts(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    flagged = p >= threshold
    return {
        "tp": int(np.sum(flagged & (y == 1))),
        "fn": int(np.sum(~flagged & (y == 1))),
        "tn": int(np.sum(~flagged & (y == 0))),
        "fp": int(np.sum(flagged & (y == 0))),
    }


def calibration(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability table in equal-width bins of predicted probability, and the expected calibration error."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count == 0:
            continue
        predicted, observed = float(p[members].mean()), float(y[members].mean())
        ece += count / len(y) * abs(predicted - observed)
        table.append(
            {"bin": [float(edges[b]), float(edges[b + 1])], "n": count, "predicted": predicted, "observed": observed}
        )
    return {"bins": table, "expected_calibration_error": ece}


# Subgroup name -> how a case's header attributes give its value.
SUBGROUPS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "manufacturer": lambda a: str(a.get("Manufacturer") or "unknown"),
    "scanner model": lambda a: str(a.get("ManufacturerModelName") or "unknown"),
    "site": lambda a: str(a.get("InstitutionName") or "unknown"),
    "view": lambda a: str(a.get("ViewPosition") or "unknown"),
    "slice thickness": lambda a: thickness_band(a.get("SliceThickness")),
    "age band": lambda a: age_band(a.get("PatientAgeYears")),
}


def subgroups(
    y: np.ndarray,
    p: np.ndarray,
    attributes: Sequence[Mapping[str, Any]],
    threshold: float,
    n_bootstrap: int = SUBGROUP_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Per subgroup (manufacturer, scanner model, site, view, slice thickness, age band), per value: n, positives,
    Se and Sp at `threshold` with 95% intervals, and AUC where both classes are present. A subgroup whose every
    case has the same value ("unknown" included) is left out: it says nothing the overall figures do not."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, list[dict[str, Any]]] = {}
    for name, value_of in SUBGROUPS.items():
        values = np.array([value_of(a) for a in attributes])
        if len(set(values)) < 2:
            continue
        rows = []
        for value in sorted(set(values)):
            members = values == value
            ys, ps = y[members], p[members]
            se, sp = se_sp(ys, ps, threshold)
            ci = bootstrap_at(ys, ps, threshold, 0.5, n_bootstrap, seed)
            rows.append(
                {
                    "value": value,
                    "n": int(members.sum()),
                    "n_positive": int(ys.sum()),
                    "sensitivity": se,
                    "sensitivity_ci95": ci["sensitivity"],
                    "specificity": sp,
                    "specificity_ci95": ci["specificity"],
                    "roc_auc": float(roc_auc_score(ys, ps)) if len(set(ys.tolist())) == 2 else None,
                }
            )
        out[name] = rows
    return out


def worst_errors(
    case_ids: Sequence[str], y: np.ndarray, p: np.ndarray, threshold: float, per_kind: int = GALLERY_PER_KIND
) -> list[dict[str, Any]]:
    """The most confident mistakes: false positives with the highest probability, false negatives with the
    lowest, `per_kind` of each."""
    flagged = p >= threshold
    fp = [i for i in np.argsort(-p) if flagged[i] and y[i] == 0][:per_kind]
    fn = [i for i in np.argsort(p) if not flagged[i] and y[i] == 1][:per_kind]
    return [
        {"kind": kind, "case": case_ids[i], "label": int(y[i]), "probability": float(p[i])}
        for kind, chosen in (("false positive", fp), ("false negative", fn))
        for i in chosen
    ]


def plot_calibration(path: Path, table: Mapping[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    bins = table["bins"]
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    if bins:
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", label="this model")
        for b in bins:
            ax.annotate(
                str(b["n"]), (b["predicted"], b["observed"]), fontsize=7, xytext=(3, -9), textcoords="offset points"
            )
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title(f"{title}\nECE {table['expected_calibration_error']:.3f} (cases per bin annotated)", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def thumbnail(source: Path, out: Path, size: int = 160) -> bool:
    """A small PNG of a case for the gallery: the radiograph, or the middle slice of a CT folder (brain window).
    False when nothing could be drawn (the gallery then lists the case without a picture)."""
    try:
        import pydicom
        from PIL import Image

        files = sorted(f for f in source.rglob("*") if f.is_file()) if source.is_dir() else [source]
        if source.suffix.lower() == ".png":
            image = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
        else:
            datasets = []
            for f in files:
                try:
                    datasets.append(pydicom.dcmread(f))
                except Exception:  # noqa: BLE001 - not DICOM
                    continue
            if not datasets:
                return False
            datasets.sort(key=lambda d: float(getattr(d, "InstanceNumber", 0) or 0))
            ds = datasets[len(datasets) // 2]
            image = ds.pixel_array.astype(np.float32)
            if image.ndim == 3:
                image = image[image.shape[0] // 2]
            if str(ds.get("Modality", "")) == "CT":
                hu = image * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
                image = np.clip((hu - 0.0) / 80.0, 0, 1) * 255
            if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
                image = image.max() - image
        low, high = np.percentile(image, [1, 99])
        scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
        picture = Image.fromarray(scaled.astype(np.uint8))
        picture.thumbnail((size, size))
        out.parent.mkdir(parents=True, exist_ok=True)
        picture.save(out)
        return True
    except Exception:  # noqa: BLE001 - a picture is a courtesy; the case stays listed
        return False


def _f(value: Any, ci: Any = None) -> str:
    if value is None:
        return "n/a"
    text = f"{float(value):.3f}"
    return text + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def write_html(path: Path, report: Mapping[str, Any]) -> None:
    """report.html: the figures, plots, operating points, subgroups and the gallery, readable without a server."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Validation of {e(report['model'])} {e(report['version'])}</title>",
        "<style>body{font:14px system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        ".warn{background:#fff3cd;padding:.5em 1em;border-left:4px solid #e0a800}figure{display:inline-block;"
        "margin:4px;text-align:center;font-size:12px}</style></head><body>",
        f"<h1>Validation of {e(report['model'])} {e(report['version'])}</h1>",
    ]
    if report.get("synthetic"):
        parts.append(
            "<p class='warn'><strong>Synthetic demonstration model, not validated.</strong> Figures on synthetic "
            "data say nothing about real studies.</p>"
        )
    site = report.get("site")
    parts.append(
        f"<p>Site: <strong>{e(str(site)) if site is not None else '(not a site validation)'}</strong>. Cases: "
        f"{report['n']} ({report['n_positive']} positive, {report['n_negative']} negative); not analysed: "
        f"{report['n_failed']}. Finding <code>{e(report['finding'])}</code> at threshold {report['threshold']}. "
        f"Prevalence used for PPV/NPV: {report['prevalence']:.3f} ({e(report['prevalence_source'])}).</p>"
    )
    parts.append("<table><tr><th>figure</th><th>value (95% CI)</th></tr>")
    for name, key in (("ROC AUC", "roc_auc"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                      ("PPV", "ppv"), ("NPV", "npv")):  # fmt: skip
        parts.append(f"<tr><td>{name}</td><td>{_f(report.get(key), report.get(f'{key}_ci95'))}</td></tr>")
    parts.append("</table><img src='roc.png' alt='ROC curve'> <img src='calibration.png' alt='calibration'>")
    parts.append("<h2>Operating points</h2><table><tr><th>point</th><th>threshold</th><th>sensitivity</th>"
                 "<th>specificity</th><th>PPV</th><th>NPV</th><th>flag rate</th></tr>")  # fmt: skip
    for row in report["operating_points"]:
        parts.append(
            f"<tr><td>{e(row['name'])}</td><td>{row['threshold']:.4f}</td>"
            f"<td>{_f(row['sensitivity'], row['sensitivity_ci95'])}</td>"
            f"<td>{_f(row['specificity'], row['specificity_ci95'])}</td><td>{_f(row['ppv'], row['ppv_ci95'])}</td>"
            f"<td>{_f(row['npv'], row['npv_ci95'])}</td><td>{row['flag_rate']:.3f}</td></tr>"
        )
    parts.append("</table><p>Choose one for this site with <code>triage models promote ... --operating-point "
                 "'sensitivity &gt;= 0.95'</code>; the gate then checks the figures at that point.</p>")  # fmt: skip
    parts.append("<h2>Subgroups</h2>")
    if not report["subgroups"]:
        parts.append("<p>Every case had the same manufacturer, scanner, site, view, thickness and age band.</p>")
    for name, rows in report["subgroups"].items():
        parts.append(f"<h3>{e(name)}</h3><table><tr><th>value</th><th>n</th><th>positive</th><th>sensitivity</th>"
                     "<th>specificity</th><th>AUC</th></tr>")  # fmt: skip
        for row in rows:
            parts.append(
                f"<tr><td>{e(row['value'])}</td><td>{row['n']}</td><td>{row['n_positive']}</td>"
                f"<td>{_f(row['sensitivity'], row['sensitivity_ci95'])}</td>"
                f"<td>{_f(row['specificity'], row['specificity_ci95'])}</td><td>{_f(row['roc_auc'])}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Worst errors</h2>")
    if not report["worst_errors"]:
        parts.append("<p>No errors at this threshold.</p>")
    for row in report["worst_errors"]:
        picture = f"<img src='{e(row['thumbnail'])}' alt=''><br>" if row.get("thumbnail") else ""
        parts.append(f"<figure>{picture}{e(row['kind'])}<br>{e(row['case'])}<br>p = {row['probability']:.3f}</figure>")
    if report.get("command"):
        parts.append(f"<p>Command: <code>{e(report['command'])}</code></p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
