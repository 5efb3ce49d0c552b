"""Tile-size benchmark for ct-head-ich: one member over a whole head CT at several DeepMedic tile sizes.

For each tile edge T (output edge T - 80) it exports member 1 at that size (torch + blast-ct needed), times one tile
with every available ONNX Runtime provider (same input, ratio against the CPU EP, max abs difference), and times the
whole-head tiled inference with the preferred provider, so the tile choice in the card rests on numbers from one run.

    python benchmarks/bench_ich_tiles.py --series tests/data/ct-head-ge --tiles 110,130,150,170,190
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from triage.config import REPO_ROOT
from triage.domain import SeriesInfo
from triage.models.registry import ModelRegistry
from triage.models.runtime import OnnxModel, available_providers
from triage.pipelines.ich import IchPipeline, segment_volume
from triage.training.export_ich import export_member


def _default_series() -> Path:
    for candidate in (REPO_ROOT / "tests" / "data" / "ct-head-ge", Path("/work/shared/data/ct-head-ge")):
        if candidate.is_dir():
            return candidate
    raise SystemExit("no head CT found; pass --series DIR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=Path, default=None)
    parser.add_argument("--tiles", default="110,130,150,170,190")
    parser.add_argument("--member", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the single tile (best is kept)")
    args = parser.parse_args()
    series_dir = args.series or _default_series()
    files = tuple(sorted(glob.glob(str(series_dir / "*.dcm"))))
    model = ModelRegistry(REPO_ROOT / "weights").get("ct-head-ich")
    pipeline = IchPipeline(model.card)
    started = time.perf_counter()
    volume = pipeline.preprocess(SeriesInfo("bench", "CT", "", len(files), files))
    print(f"series {series_dir} -> volume {volume.image.shape} (z, y, x) in {time.perf_counter() - started:.1f} s")
    providers = available_providers(["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    print(f"providers {providers}; cores {os.cpu_count()}; intra-op threads: onnxruntime default (one per core)")
    source = REPO_ROOT / "weights-src" / "blast-ct-v1" / f"model_{args.member}.pt"
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tile in [int(t) for t in args.tiles.split(",")]:
            path = export_member(source, Path(tmp) / f"member_{tile}.onnx", tile)
            post = dict(model.card.postprocessing, tile_input_voxels=tile, tile_output_voxels=tile - 80)
            card = model.card.model_copy(update={"postprocessing": post})
            # One tile from the real volume (its centre), per provider.
            z, y, x = (max(0, (s - tile) // 2) for s in volume.image.shape)
            tile_in = np.full((1, 1, tile, tile, tile), -1.0, dtype=np.float32)
            crop = volume.image[z : z + tile, y : y + tile, x : x + tile]
            tile_in[0, 0, : crop.shape[0], : crop.shape[1], : crop.shape[2]] = crop
            per_provider = {}
            outputs = {}
            for provider in providers:
                chosen = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
                onnx_model = OnnxModel.load(path, chosen)
                onnx_model.run(tile_in)  # warm-up (OpenVINO compiles on first run)
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    outputs[provider] = onnx_model.run(tile_in)
                    best = min(best, time.perf_counter() - t0)
                per_provider[provider] = best
            diff = 0.0
            if len(outputs) > 1:
                values = list(outputs.values())
                diff = float(np.max(np.abs(values[0] - values[1])))
            member = OnnxModel.load(path, [providers[0], "CPUExecutionProvider"])
            member.run(tile_in)
            t0 = time.perf_counter()
            raw = segment_volume(volume, [member], card)
            whole = time.perf_counter() - t0
            rows.append((tile, per_provider, diff, whole, raw.tiles_run, raw.tiles_skipped))
            cpu = per_provider.get("CPUExecutionProvider", float("nan"))
            tile_times = "  ".join(f"{p.replace('ExecutionProvider', '')} {s:.2f}s" for p, s in per_provider.items())
            cpu_ratio = cpu / per_provider[providers[0]]
            print(
                f"tile {tile:3d} -> out {tile - 80:3d}: one tile {tile_times} (CPU/first = {cpu_ratio:.2f}x,"
                f" max|diff| {diff:.1e}); whole head {whole:.1f} s with {providers[0]}, tiles run {raw.tiles_run},"
                f" skipped {raw.tiles_skipped}",
                flush=True,
            )
    base = next((r for r in rows if r[0] == model.card.postprocessing["tile_input_voxels"]), rows[0])
    print(f"\nwhole-head seconds relative to tile {base[0]} (same process):")
    for tile, _, _, whole, run, skipped in rows:
        print(f"  tile {tile:3d}: {whole:6.1f} s  ratio {whole / base[3]:.2f}  tiles {run} run / {skipped} skipped")
    del rng


if __name__ == "__main__":
    main()
