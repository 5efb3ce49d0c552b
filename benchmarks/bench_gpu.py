"""Seconds per study on each execution provider: the 12-member head-CT ensemble and a batch of radiographs.

A benchmark, not a test: it prints figures and asserts nothing. Run on a machine with a GPU (CUDA and TensorRT
execution providers from onnxruntime-gpu, e.g. the image of Dockerfile.gpu); the CPU path is measured in the
same run and every figure is given as a ratio to it. A provider onnxruntime does not offer here is reported as
such, not measured.

Usage: python benchmarks/bench_gpu.py [--ct-members 12] [--radiographs 64] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from triage.domain import SeriesInfo  # noqa: E402
from triage.models.registry import ModelRegistry  # noqa: E402
from triage.models.runtime import load_members  # noqa: E402
from triage.pipelines.base import pipeline_for  # noqa: E402

HEAD_CT = REPO / "tests" / "data" / "ct-head-ge"
PATHS = {
    "cpu": ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider"],
}


def _series(files: list[Path], modality: str) -> SeriesInfo:
    return SeriesInfo("bench", modality, "", len(files), tuple(str(f) for f in files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-members", type=int, default=12)
    parser.add_argument("--radiographs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="items per ONNX run where the graph allows")
    parser.add_argument("--paths", default="cpu,cuda,tensorrt")
    args = parser.parse_args()
    import onnxruntime as ort

    from triage.training.synth_xray import generate_dataset

    offered = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}; providers offered: {offered}; {os.cpu_count()} cores")
    registry = ModelRegistry(REPO / "weights")
    ct, xr = registry.get("ct-head-ich"), registry.get("xr-chest-pneumothorax")
    ct_pipeline, xr_pipeline = pipeline_for(ct.card), pipeline_for(xr.card)
    head = ct_pipeline.preprocess(_series(sorted(HEAD_CT.glob("*.dcm")), "CT"))
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp), n=args.radiographs, positive_fraction=0.5, seed=3, fmt="dicom")
        films = [xr_pipeline.preprocess(_series([f], "DX")) for f in sorted(Path(tmp).rglob("*.dcm"))]
    rows = []
    for name in [p.strip() for p in args.paths.split(",") if p.strip()]:
        wanted = PATHS[name]
        if name != "cpu" and wanted[0] not in offered:
            rows.append((name, None, None, "not offered by this onnxruntime"))
            continue
        fp16 = name == "tensorrt"
        cache = tempfile.mkdtemp(prefix="trt-") if fp16 else ""
        members = load_members(ct, wanted, args.ct_members, fp16=fp16, trt_cache_dir=cache)
        ct_pipeline.infer(head, members[:1], args.batch)  # warm-up (TensorRT builds its engines here)
        started = time.perf_counter()
        ct_pipeline.infer(head, members, args.batch)
        ct_s = time.perf_counter() - started
        xr_members = load_members(xr, wanted, 0, fp16=fp16, trt_cache_dir=cache)
        items = [f.image for f in films]
        from triage.pipelines.base import run_members

        run_members(xr_members, items[: args.batch], xr_pipeline.reduce_members)  # warm-up
        started = time.perf_counter()
        for start in range(0, len(items), args.batch):
            run_members(xr_members, items[start : start + args.batch], xr_pipeline.reduce_members)
        xr_s = (time.perf_counter() - started) / len(items)
        precision = ",".join(sorted({m.precision for m in members}))
        rows.append((name, ct_s, xr_s, f"{members[0].providers[0]} {precision}"))
        print(rows[-1], flush=True)
    base = next((r for r in rows if r[0] == "cpu" and r[1]), None)
    print()
    print(f"{'path':10} {'CT s/study':>11} {'vs CPU':>7} {'XR s/study':>11} {'vs CPU':>7}  provider")
    for name, ct_s, xr_s, note in rows:
        if ct_s is None or xr_s is None:
            print(f"{name:10} {'-':>11} {'-':>7} {'-':>11} {'-':>7}  {note}")
            continue
        ct_ratio = f"{base[1] / ct_s:.2f}x" if base else "-"
        xr_ratio = f"{base[2] / xr_s:.2f}x" if base else "-"
        print(f"{name:10} {ct_s:11.2f} {ct_ratio:>7} {xr_s:11.4f} {xr_ratio:>7}  {note}")
    print(f"(CT: the real head CT, {args.ct_members} members; XR: {args.radiographs} generated radiographs, "
          f"batches of {args.batch}; ratios are CPU seconds / these seconds)")


if __name__ == "__main__":
    main()
