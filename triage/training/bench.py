"""Benchmarks and ensemble measurements for installed models: stage latency, providers vs torch, member agreement."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.config import REPO_ROOT
from triage.domain import SeriesInfo
from triage.models.card import Figure, read_card, write_card
from triage.models.registry import InstalledModel, ModelRegistry
from triage.models.runtime import OnnxModel, available_providers, cpu_has_bf16, load_members, provider_options
from triage.pipelines.base import pipeline_for

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
HEAD_CT_DIRS = (REPO_ROOT / "tests" / "data" / "ct-head-ge", Path("/work/shared/data/ct-head-ge"))


def _series_from(path: Path) -> SeriesInfo:
    """A SeriesInfo for a folder of DICOM files (one series) or a single file."""
    path = Path(path)
    if path.is_dir():
        files = tuple(sorted(str(p) for p in path.iterdir() if p.is_file() and _looks_dicom(p)))
    else:
        files = (str(path),)
    if not files:
        raise FileNotFoundError(f"no DICOM files in {path}")
    return SeriesInfo(
        series_uid=f"bench:{path.name}", modality="", sop_class_uid="", n_instances=len(files), files=files
    )


def _looks_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(132)
    return head[128:132] == b"DICM"


def default_input(model: InstalledModel, workdir: Path) -> Path:
    """A real or generated input for the model when none is given (the real head CT; a synthetic radiograph)."""
    if model.card.pipeline == "ct-head-ich-deepmedic":
        for candidate in HEAD_CT_DIRS:
            if candidate.is_dir():
                return candidate
        raise FileNotFoundError(f"no head CT in {[str(d) for d in HEAD_CT_DIRS]}; pass an input path")
    from triage.training.synth_xray import make_chest_radiograph_dataset

    path = workdir / "synthetic_chest.dcm"
    make_chest_radiograph_dataset(seed=0, positive=True).save_as(path, enforce_file_format=True)
    return path


def network_input(model: InstalledModel, prepared: Any) -> np.ndarray:
    """The array one ONNX call takes for this prepared input (a centre tile for the tiled CT model)."""
    shape = [int(s) if s else 1 for s in model.card.inputs.tensor.shape]
    image = np.asarray(getattr(prepared, "image", prepared), dtype=np.float32)
    if model.card.pipeline == "ct-head-ich-deepmedic":
        edge = shape[-1]
        tile = np.full(shape, float(model.card.postprocessing["pad_value"]), dtype=np.float32)
        z, y, x = (max(0, (s - edge) // 2) for s in image.shape)
        crop = image[z : z + edge, y : y + edge, x : x + edge]
        tile[0, 0, : crop.shape[0], : crop.shape[1], : crop.shape[2]] = crop
        return tile
    return image.reshape(shape)


def torch_network(model: InstalledModel) -> tuple[Any, str]:
    """The same network in torch eager for the provider comparison, or (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install 'triage[train]')"
    if model.card.pipeline == "ct-head-ich-deepmedic":
        try:
            from triage.training.export_ich import load_deepmedic, probability_network

            source = REPO_ROOT / "weights-src" / "blast-ct-v1" / "model_1.pt"
            return probability_network(load_deepmedic(source)), f"blast_ct DeepMedic from {source.name}"
        except Exception as exc:  # noqa: BLE001 - the comparison is optional; say why it is missing
            return None, f"DeepMedic unavailable: {exc}"
    try:
        from triage.models.xray_net import build_xray_net

        state_path = model.directory / "model.pt"
        if not state_path.is_file():
            return None, f"no torch state dict at {state_path}"
        net = build_xray_net(model.card)
        net.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        return net.eval(), f"build_xray_net + {state_path.name}"
    except Exception as exc:  # noqa: BLE001
        return None, f"torch network unavailable: {exc}"


def _best_of(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench_model(
    registry_model: InstalledModel,
    input_path: Path | None,
    repeats: int,
    members: int,
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 0,
    torch_eager: bool = True,
) -> dict[str, Any]:
    """Measure one model through its pipeline and compare ONNX Runtime providers with torch eager.

    Stages (seconds): load (sha256 check + sessions), preprocess, inference (best of `repeats`), postprocess.
    Then one network call on the same input with each available provider alone, and with torch eager (one call:
    for ct-head-ich one tile, it is slow), with the ratio of each to the fastest.

    Args:
        registry_model: the installed model (ModelRegistry.get).
        input_path: a DICOM series folder or file; None: the real head CT or a generated radiograph.
        repeats: timed repetitions of inference and of each single network call (best is reported).
        members: ensemble members (0: the card's default for the device).
        providers: provider preference (default: CUDA, OpenVINO, CPU; unavailable ones are skipped).
        intra_op_threads: onnxruntime intra-op threads (0: its default, one per core).
        torch_eager: include the torch eager comparison.

    Returns:
        A JSON-ready dict of the figures (also printed as a table by `print_report`).
    """
    providers = list(providers or DEFAULT_PROVIDERS)
    card = registry_model.card
    report: dict[str, Any] = {"model": card.key, "cores": os.cpu_count(), "intra_op_threads": intra_op_threads}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(input_path) if input_path else default_input(registry_model, Path(tmp))
        report["input"] = str(path)
        series = _series_from(path)
        pipeline = pipeline_for(card)
        started = time.perf_counter()
        loaded = load_members(registry_model, providers, members, intra_op_threads)
        stages = {"load": time.perf_counter() - started}
        started = time.perf_counter()
        prepared = pipeline.preprocess(series)
        stages["preprocess"] = time.perf_counter() - started
        raw = None

        def _infer() -> None:
            nonlocal raw
            raw = pipeline.infer(prepared, loaded)

        stages["inference"] = _best_of(_infer, repeats)
        started = time.perf_counter()
        findings = pipeline.postprocess(prepared, raw, series)
        stages["postprocess"] = time.perf_counter() - started
    per_study = stages["preprocess"] + stages["inference"] + stages["postprocess"]
    report.update(
        {
            "members": len(loaded),
            "providers_used": list(loaded[0].providers),
            "stages_s": {k: round(v, 5) for k, v in stages.items()},
            "per_study_s": round(per_study, 5),
            "studies_per_hour_one_worker": round(3600.0 / per_study, 1),
            "findings": [f.model_dump(mode="json") for f in findings],
        }
    )
    report["session_intra_op_threads"] = _session_threads(loaded[0])
    report["network"] = compare_networks(registry_model, network_input(registry_model, prepared), repeats, torch_eager)
    return report


def _session_threads(member: OnnxModel) -> int:
    options = member.session.get_session_options()  # type: ignore[attr-defined]
    return int(options.intra_op_num_threads) or int(os.cpu_count() or 1)


def compare_networks(
    model: InstalledModel, batch: np.ndarray, repeats: int, torch_eager: bool = True
) -> dict[str, Any]:
    """Time one call of member 1 on `batch` with each available provider alone and with torch eager."""
    results: dict[str, Any] = {"input_shape": list(batch.shape), "seconds": {}, "max_abs_diff_vs_torch": {}}
    outputs: dict[str, np.ndarray] = {}
    for provider in available_providers(DEFAULT_PROVIDERS):
        member = OnnxModel.load(model.weight_paths()[0], [provider])
        member.run(batch)  # warm-up: OpenVINO and CUDA compile on the first call
        results["seconds"][provider] = round(
            _best_of(lambda m=member, p=provider: outputs.__setitem__(p, m.run(batch)), repeats), 5
        )
    if torch_eager:
        net, how = torch_network(model)
        results["torch"] = how
        if net is not None:
            import torch

            results["torch_threads"] = torch.get_num_threads()
            holder: dict[str, Any] = {}

            def _run() -> None:
                with torch.inference_mode():
                    holder["out"] = net(torch.from_numpy(batch))

            # ct-head-ich: one cold call on one tile only, torch eager is slow there; others get a warm-up.
            slow = model.card.pipeline == "ct-head-ich-deepmedic"
            if not slow:
                _run()
            results["seconds"]["torch-eager"] = round(_best_of(_run, 1 if slow else repeats), 5)
            out = holder["out"]
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(out, dict):
                first = next(iter(out.values()))
            reference = first.detach().numpy()
            for provider, got in outputs.items():
                if got.shape == reference.shape:
                    results["max_abs_diff_vs_torch"][provider] = float(np.max(np.abs(got - reference)))
    fastest = min(results["seconds"].values())
    results["ratio_to_fastest"] = {k: round(v / fastest, 2) for k, v in results["seconds"].items()}
    return results


def print_report(report: dict[str, Any]) -> None:
    """Print the benchmark as plain-text tables."""
    print(f"model {report['model']}  input {report['input']}")
    print(
        f"members {report['members']}  providers {report['providers_used']}  cores {report['cores']}  "
        f"onnxruntime intra-op threads {report['session_intra_op_threads']}"
    )
    print(f"{'stage':<14}{'seconds':>10}")
    for stage, seconds in report["stages_s"].items():
        print(f"{stage:<14}{seconds:>10.4f}")
    print(
        f"{'per study':<14}{report['per_study_s']:>10.4f}"
        f"   ({report['studies_per_hour_one_worker']} studies/h, one worker)"
    )
    net = report["network"]
    print(f"\none network call on input {net['input_shape']} (member 1; torch: {net.get('torch', 'skipped')})")
    print(f"{'runtime':<28}{'seconds':>10}{'x fastest':>11}{'max|diff| vs torch':>20}")
    for name, seconds in net["seconds"].items():
        diff = net["max_abs_diff_vs_torch"].get(name)
        diff_text = f"{diff:.1e}" if diff is not None else "-"
        print(f"{name:<28}{seconds:>10.4f}{net['ratio_to_fastest'][name]:>11.2f}{diff_text:>20}")
    for finding in report["findings"]:
        print(f"\nfinding {finding['label']}: p={finding['probability']} flagged={finding['flagged']}")


# ------------------------------------------------------------------------------------------ ensemble agreement


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (agreement on nothing is not a Dice of 1)."""
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def ensemble_agreement(
    model: InstalledModel,
    series_dirs: Sequence[Path],
    subsets: Sequence[int] = (1, 3),
    providers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare the first-k-member ensembles with the full ensemble on each series (ct-head-ich).

    Each member runs once per series; subset results are averages of the first k members' probabilities, exactly
    what `load_members(..., members=k)` would run. Reports per series and subset: the study probability and flag,
    their difference from the full ensemble, the Dice of the bleed masks, and seconds per member.
    """
    from triage.pipelines.ich import IchRaw, bleed_mask, segment_volume

    providers = list(providers or DEFAULT_PROVIDERS)
    card = model.card
    pipeline = pipeline_for(card)
    everyone = load_members(model, providers, card.ensemble.members)
    full = len(everyone)
    out: dict[str, Any] = {"model": card.key, "providers": list(everyone[0].providers), "series": {}}
    for series_dir in series_dirs:
        series = _series_from(Path(series_dir))
        prepared = pipeline.preprocess(series)
        n_classes = len(card.outputs.labels)
        summed = np.zeros((n_classes, *prepared.image.shape), dtype=np.float32)
        member_seconds = []
        cumulative: dict[int, np.ndarray] = {}
        tiles = (0, 0)
        for index, member in enumerate(everyone, start=1):
            started = time.perf_counter()
            raw = segment_volume(prepared, [member], card, return_probabilities=True)
            member_seconds.append(time.perf_counter() - started)
            summed += raw.probabilities
            tiles = (raw.tiles_run, raw.tiles_skipped)
            if index in subsets or index == full:
                cumulative[index] = np.argmax(summed, axis=0).astype(np.uint8)
            log.info("%s member %d: %.1f s", series_dir, index, member_seconds[-1])
        rows: dict[str, Any] = {}
        voxel_ml = prepared.voxel_volume_ml
        full_finding = pipeline.postprocess(prepared, IchRaw(cumulative[full], full, *tiles), series)[0]
        full_mask, _ = bleed_mask(cumulative[full], card, voxel_ml)
        for k in sorted(cumulative):
            finding = pipeline.postprocess(prepared, IchRaw(cumulative[k], k, *tiles), series)[0]
            mask, _ = bleed_mask(cumulative[k], card, voxel_ml)
            rows[str(k)] = {
                "probability": round(finding.probability, 4),
                "flagged": finding.flagged,
                "volume_ml": finding.details["volume_ml"],
                "subtype": finding.details["subtype"],
                "probability_diff_vs_full": round(abs(finding.probability - full_finding.probability), 4),
                "flag_agrees_with_full": finding.flagged == full_finding.flagged,
                "dice_vs_full": None if (d := dice(mask, full_mask)) is None else round(d, 3),
            }
        out["series"][str(series_dir)] = {
            "members": rows,
            "seconds_per_member": round(float(np.median(member_seconds)), 2),
            "tiles_run": tiles[0],
            "tiles_skipped": tiles[1],
        }
    return out


def quantize_int8(member: Path, input_name: str, calibration: Sequence[np.ndarray], out: Path) -> Path:
    """Write an int8 (QDQ, per-channel weights, uint8 activations) copy of one member, its activation ranges
    calibrated on `calibration` (inputs of the graph input `input_name`, without the batch axis), with
    onnxruntime's static quantizer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._items, None)
            return None if item is None else {input_name: np.asarray(item, dtype=np.float32)[None]}

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(member), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink()
    return out


def precision_agreement(
    model: InstalledModel,
    series_dirs: Sequence[Path],
    calibration_dir: Path,
    threads: Sequence[int] = (0, 1),
    calibration_tiles: int = 16,
) -> dict[str, Any]:
    """ct-head-ich member 1 on OpenVINO in fp32, bf16 and int8 over whole heads: seconds per member and the bf16
    and int8 segmentations against fp32 (Dice of the bleed masks, bleed volume difference, max probability
    difference, flag agreement); fp32 and bf16 also at each OpenVINO thread count in `threads` (0: one per core)
    on the first series. int8 is calibrated on tissue tiles of `calibration_dir`, a series not among those
    compared. bf16 runs only on CPUs with bf16 units (AMX, AVX512-BF16): elsewhere OpenVINO would run fp32."""
    from triage.pipelines.ich import IchRaw, bleed_mask, segment_volume, tile_inputs

    card = model.card
    model.verify()
    pipeline = pipeline_for(card)
    member = model.weight_paths()[0]
    provider = "OpenVINOExecutionProvider"
    if provider not in available_providers([provider]):
        raise SystemExit("the precision comparison needs onnxruntime-openvino")
    out: dict[str, Any] = {"model": card.key, "member": member.name, "cores": os.cpu_count(), "series": {}}
    out["cpu_bf16_units"] = cpu_has_bf16()
    calibration_volume = pipeline.preprocess(_series_from(calibration_dir))
    items, _ = tile_inputs(calibration_volume, card)
    stride = max(1, len(items) // calibration_tiles)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        calibration = items[::stride][:calibration_tiles]
        int8_path = quantize_int8(member, card.inputs.tensor.name, calibration, Path(tmp) / "member_int8.onnx")
        out["int8_quantize_s"] = round(time.perf_counter() - started, 1)

        def _session(precision: str, n_threads: int) -> OnnxModel:
            options = provider_options([provider], False, bf16=precision == "bf16", threads=n_threads)
            session = OnnxModel.load(int8_path if precision == "int8" else member, options)
            session.precision = precision
            return session

        variants = [("fp32", t) for t in threads] + [("bf16", t) for t in threads] + [("int8", threads[0])]
        if not out["cpu_bf16_units"]:
            variants = [v for v in variants if v[0] != "bf16"]
        for index, series_dir in enumerate(series_dirs):
            series = _series_from(Path(series_dir))
            prepared = pipeline.preprocess(series)
            voxel_ml = prepared.voxel_volume_ml
            results: dict[str, Any] = {}
            for precision, n_threads in variants if index == 0 else [v for v in variants if v[1] == threads[0]]:
                session = _session(precision, n_threads)
                # OpenVINO compiles on the first call: keep that out of the timing.
                session.run(np.zeros([d or 1 for d in card.inputs.tensor.shape], dtype=np.float32))
                started = time.perf_counter()
                raw = segment_volume(prepared, [session], card, return_probabilities=True)
                seconds = time.perf_counter() - started
                results[f"{precision}/threads={n_threads or 'all'}"] = (precision, seconds, raw)
            reference = next(r for r in results.values() if r[0] == "fp32")[2]
            ref_mask, _ = bleed_mask(reference.labels, card, voxel_ml)
            ref_finding = pipeline.postprocess(prepared, IchRaw(reference.labels, 1, 0, 0), series)[0]
            rows = {}
            for key, (_, seconds, raw) in results.items():
                mask, _ = bleed_mask(raw.labels, card, voxel_ml)
                finding = pipeline.postprocess(prepared, IchRaw(raw.labels, 1, 0, 0), series)[0]
                d = dice(mask, ref_mask)
                rows[key] = {
                    "seconds_per_member": round(seconds, 2),
                    "volume_ml": finding.details["volume_ml"],
                    "volume_diff_ml_vs_fp32": round(
                        abs(finding.details["volume_ml"] - ref_finding.details["volume_ml"]), 3
                    ),
                    "dice_vs_fp32": None if d is None else round(d, 4),
                    "max_probability_diff_vs_fp32": round(
                        float(np.max(np.abs(raw.probabilities - reference.probabilities))), 5
                    ),
                    "voxels_with_another_class": int(np.count_nonzero(raw.labels != reference.labels)),
                    "flag_agrees_with_fp32": finding.flagged == ref_finding.flagged,
                }
            out["series"][str(series_dir)] = {"tiles_run": reference.tiles_run, "variants": rows}
    return out


def print_precision(report: dict[str, Any]) -> None:
    """The precision comparison as a plain-text table, seconds also as a ratio to fp32 on all cores."""
    print(f"{report['model']} {report['member']} on OpenVINO, {report['cores']} cores, "
          f"CPU bf16 units: {report['cpu_bf16_units']}, int8 quantized in {report['int8_quantize_s']} s")  # fmt: skip
    for series, entry in report["series"].items():
        rows = entry["variants"]
        base = next(r["seconds_per_member"] for k, r in rows.items() if k.startswith("fp32/"))
        print(f"\n{series} ({entry['tiles_run']} tiles)")
        print(f"{'variant':<22}{'s/member':>9}{'x fp32':>8}{'vol mL':>8}{'|dvol|':>8}{'Dice':>8}"
              f"{'max|dp|':>9}{'voxels':>8}{'flag=':>7}")  # fmt: skip
        for key, r in rows.items():
            dice_text = "-" if r["dice_vs_fp32"] is None else f"{r['dice_vs_fp32']:.4f}"
            print(
                f"{key:<22}{r['seconds_per_member']:>9.2f}{base / r['seconds_per_member']:>8.2f}"
                f"{r['volume_ml']:>8.3f}{r['volume_diff_ml_vs_fp32']:>8.3f}{dice_text:>8}"
                f"{r['max_probability_diff_vs_fp32']:>9.4f}{r['voxels_with_another_class']:>8}"
                f"{str(r['flag_agrees_with_fp32']):>7}"
            )


def record_figures(card_path: Path, figures: Sequence[Figure]) -> None:
    """Replace the card's figures of the same names with these measured ones (others are kept)."""
    card = read_card(card_path)
    names = {f.name for f in figures}
    kept = [f for f in card.figures if f.name not in names]
    write_card(card.model_copy(update={"figures": [*kept, *figures]}), card_path)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m triage.training.bench model NAME [--input P] [--repeats N] [--members K]`
    or `python -m triage.training.bench agreement [--series DIR ...] [--out report.json]`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("model", help="stage latency and provider comparison for one installed model")
    one.add_argument("name")
    one.add_argument("--input", type=Path, default=None)
    one.add_argument("--repeats", type=int, default=1)
    one.add_argument("--members", type=int, default=0)
    one.add_argument("--no-torch", action="store_true")
    one.add_argument("--json", type=Path, default=None)
    agree = sub.add_parser("agreement", help="ct-head-ich: first-k members vs the full ensemble")
    agree.add_argument("--series", type=Path, nargs="+", required=True)
    agree.add_argument("--subsets", default="1,3")
    agree.add_argument("--out", type=Path, required=True)
    prec = sub.add_parser("precision", help="ct-head-ich: bf16 and int8 against fp32 on OpenVINO, and threads")
    prec.add_argument("--series", type=Path, nargs="+", required=True)
    prec.add_argument("--calibration", type=Path, required=True, help="series whose tiles calibrate int8")
    prec.add_argument("--threads", default="0,1", help="OpenVINO thread counts to time (0: one per core)")
    prec.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    registry = ModelRegistry(args.weights)
    if args.command == "model":
        report = bench_model(
            registry.get(args.name), args.input, args.repeats, args.members, torch_eager=not args.no_torch
        )
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    elif args.command == "precision":
        threads = [int(t) for t in args.threads.split(",")]
        result = precision_agreement(registry.get("ct-head-ich"), args.series, args.calibration, threads)
        args.out.write_text(json.dumps(result, indent=2))
        print_precision(result)
    else:
        subsets = [int(s) for s in args.subsets.split(",")]
        result = ensemble_agreement(registry.get("ct-head-ich"), args.series, subsets)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
