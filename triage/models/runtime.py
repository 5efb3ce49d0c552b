"""The ONNX Runtime wrapper: sessions built once, execution providers chosen from settings."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.errors import InferenceError, ModelLoadError
from triage.models.registry import InstalledModel

log = logging.getLogger(__name__)


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def available_providers(preferred: Sequence[str], allowed: Sequence[str] = ()) -> list[str]:
    """The preferred providers that the installed onnxruntime offers (and the card allows, when it names any),
    in preference order, CPU always last."""
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in offered and p != "CPUExecutionProvider" and (not allowed or p in allowed)]
    return [*chosen, "CPUExecutionProvider"]


def provider_options(
    providers: Sequence[str], fp16: bool, cache_dir: str = "", bf16: bool = False, threads: int = 0
) -> list[Any]:
    """Providers with their options: TensorRT in fp16 when asked, its engines cached (building one is slow);
    OpenVINO on the CPU with its inference precision set (bf16 when asked, else fp32) and its thread count (0: one
    per core; OpenVINO keeps its own threads, onnxruntime's intra-op setting does not reach them)."""
    configured: list[Any] = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            options: dict[str, Any] = {"trt_fp16_enable": bool(fp16)}
            if cache_dir:
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache_dir)
            configured.append((name, options))
        elif name == "OpenVINOExecutionProvider":
            hint = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
            options = {"device_type": "CPU", "load_config": json.dumps({"CPU": hint})}
            if threads:
                options["num_of_threads"] = str(threads)
            configured.append((name, options))
        else:
            configured.append(name)
    return configured


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has the bf16 units OpenVINO runs bf16 on (AMX or AVX512-BF16), from the kernel's CPU flags;
    False where they cannot be read (not Linux). onnxruntime-openvino does not ship OpenVINO's Python API to ask."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def parity_gap(candidate: OnnxModel, reference: OnnxModel, probe: np.ndarray) -> float:
    """The largest |difference| between any output of two sessions of one graph on `probe` (with batch axis)."""
    got, want = candidate.run_all(probe), reference.run_all(probe)
    return max(float(np.max(np.abs(got[name].astype(np.float64) - want[name]))) for name in want)


def parity_probe(shape: Sequence[int | None], seed: int = 0) -> np.ndarray:
    """A reproducible input of the card's tensor shape (free axes 1) with values in the scaled range [-1, 1]."""
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    return np.random.default_rng(seed).uniform(-1.0, 1.0, dims).astype(np.float32)


@dataclass
class OnnxModel:
    """One loaded ONNX graph with its session. Create once per worker and reuse: building a session is slow."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    input_name: str
    output_name: str
    providers: list[str]
    output_names: tuple[str, ...] = ()
    # The graph's fixed batch size, or None when its batch axis is dynamic (any number of items per run).
    fixed_batch: int | None = None
    precision: str = "fp32"

    @classmethod
    def load(cls, path: Path, providers: Sequence[Any], intra_op_threads: int = 0) -> OnnxModel:
        """Build an inference session.

        Raises:
            ModelLoadError: when onnxruntime cannot read the file.
        """
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        return cls(
            path=path,
            session=session,
            input_name=session.get_inputs()[0].name,
            output_name=session.get_outputs()[0].name,
            providers=session.get_providers(),
            output_names=tuple(o.name for o in session.get_outputs()),
            fixed_batch=_fixed_batch(session.get_inputs()[0].shape),
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the graph on one input array (its shape must match the graph's input).

        Raises:
            InferenceError: when onnxruntime fails on the input.
        """
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: batch})  # type: ignore[attr-defined]
        except Exception as exc:
            raise InferenceError(f"inference with {self.path.name} failed on input {batch.shape}: {exc}") from exc
        return np.asarray(out)

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph and return every output by name (for graphs with several outputs).

        Raises:
            InferenceError: when onnxruntime fails on the input.
        """
        try:
            outs = self.session.run(list(self.output_names), {self.input_name: batch})  # type: ignore[attr-defined]
        except Exception as exc:
            raise InferenceError(f"inference with {self.path.name} failed on input {batch.shape}: {exc}") from exc
        return {name: np.asarray(o) for name, o in zip(self.output_names, outs, strict=True)}

    def run_items(self, items: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run the graph over items (its input shape without the batch axis), batched as the graph allows.

        A graph with a dynamic batch axis takes all items in one run; one exported with a fixed batch size takes
        them that many at a time.

        Returns:
            Per item, every output by name with the batch axis removed.

        Raises:
            InferenceError: when onnxruntime fails on the input.
        """
        step = self.fixed_batch or max(1, len(items))
        results: list[dict[str, np.ndarray]] = []
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            batch = np.ascontiguousarray(np.stack([np.asarray(x, dtype=np.float32) for x in chunk]))
            outputs = self.run_all(batch)
            results += [{name: out[i] for name, out in outputs.items()} for i in range(len(chunk))]
        return results


def _fixed_batch(shape: Sequence[object]) -> int | None:
    """The first input dimension when the graph fixes it (an int), None when it is symbolic (dynamic)."""
    first = shape[0] if shape else None
    return first if isinstance(first, int) and first > 0 else None


def load_members(
    model: InstalledModel,
    providers: Sequence[str],
    members: int = 0,
    intra_op_threads: int = 0,
    fp16: bool = False,
    trt_cache_dir: str = "",
    bf16: bool = False,
) -> list[OnnxModel]:
    """Verify the weights against the card and load the first `members` files (0: the card's default).

    Providers are the preferred ones that onnxruntime offers and the card allows. The default member count is the
    card's `ensemble.default_gpu` when a GPU provider is in use, else `default_cpu`. With `fp16` and a card that
    allows it, TensorRT builds fp16 engines; with `bf16`, a card that allows it and a CPU with bf16 units,
    OpenVINO runs in bf16. Each reduced-precision session is compared with an fp32 CPU session on a probe input
    and rebuilt in fp32 when the difference exceeds the card's tolerance for that precision.

    Raises:
        ModelLoadError: on a sha256 mismatch, a missing file or an unloadable graph.
    """
    model.verify()
    card = model.card
    chosen = available_providers(providers, card.runtime.providers)
    on_gpu = any(p in chosen for p in GPU_PROVIDERS)
    count = members or (card.ensemble.default_gpu if on_gpu else card.ensemble.default_cpu)
    paths = model.weight_paths()
    if count < 1 or count > len(paths):
        raise ModelLoadError(f"{card.key} has {len(paths)} members; cannot run {count}")
    reduced, tolerance = "fp32", 0.0
    if fp16 and card.runtime.fp16 and "TensorrtExecutionProvider" in chosen:
        reduced, tolerance = "fp16", card.runtime.fp16_parity_tolerance
    elif bf16 and card.runtime.bf16 and chosen[0] == "OpenVINOExecutionProvider" and cpu_has_bf16():
        reduced, tolerance = "bf16", card.runtime.bf16_parity_tolerance
    log.info("loading %s: %d member(s) on %s in %s", card.key, count, chosen, reduced)

    def _session(path: Path, precision: str) -> OnnxModel:
        options = provider_options(
            chosen, precision == "fp16", trt_cache_dir, bf16=precision == "bf16", threads=intra_op_threads
        )
        return OnnxModel.load(path, options, intra_op_threads)

    loaded = []
    for path in paths[:count]:
        session = _session(path, reduced)
        if reduced != "fp32":
            reference = OnnxModel.load(path, ["CPUExecutionProvider"], intra_op_threads)
            gap = parity_gap(session, reference, parity_probe(card.inputs.tensor.shape))
            if gap > tolerance:
                log.warning(
                    "%s %s: %s differs from fp32 by %.3g (tolerance %.3g): running it in fp32",
                    card.key, path.name, reduced, gap, tolerance,
                )  # fmt: skip
                session = _session(path, "fp32")
            else:
                session.precision = reduced
        loaded.append(session)
    return loaded
