"""The ONNX Runtime wrapper: sessions built once, execution providers chosen from settings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triage.errors import InferenceError, ModelLoadError
from triage.models.registry import InstalledModel

log = logging.getLogger(__name__)


def available_providers(preferred: Sequence[str]) -> list[str]:
    """The preferred providers that the installed onnxruntime offers, in preference order (CPU always last)."""
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in offered and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


@dataclass
class OnnxModel:
    """One loaded ONNX graph with its session. Create once per worker and reuse: building a session is slow."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    input_name: str
    output_name: str
    providers: list[str]
    output_names: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path, providers: Sequence[str], intra_op_threads: int = 0) -> OnnxModel:
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


def load_members(
    model: InstalledModel, providers: Sequence[str], members: int = 0, intra_op_threads: int = 0
) -> list[OnnxModel]:
    """Verify the weights against the card and load the first `members` files (0: the card's default).

    The default is the card's `ensemble.default_gpu` when a GPU provider is in use, else `default_cpu`.

    Raises:
        ModelLoadError: on a sha256 mismatch, a missing file or an unloadable graph.
    """
    model.verify()
    chosen = available_providers(providers)
    on_gpu = any(p in chosen for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    count = members or (model.card.ensemble.default_gpu if on_gpu else model.card.ensemble.default_cpu)
    paths = model.weight_paths()
    if count < 1 or count > len(paths):
        raise ModelLoadError(f"{model.card.key} has {len(paths)} members; cannot run {count}")
    log.info("loading %s: %d member(s) on %s", model.card.key, count, chosen)
    return [OnnxModel.load(p, chosen, intra_op_threads) for p in paths[:count]]
