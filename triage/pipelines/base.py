"""The contract every model pipeline keeps, so that a runner (in-process or Ray) can execute any of them.

A pipeline is chosen by the `pipeline` field of a model's card; its three stages run in different places:
`preprocess` and `postprocess` are CPU work (Ray tasks), `infer` runs inside an inference worker that keeps
the ONNX sessions loaded. What passes between stages must be picklable (numpy arrays, dataclasses).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from triage.domain import Finding, SeriesInfo
from triage.errors import ModelLoadError
from triage.models.card import ModelCard
from triage.models.runtime import OnnxModel
from triage.storage import InstanceSource

# card.pipeline -> "module:Class". New model kinds register here; new versions of a kind need no code.
PIPELINES: dict[str, str] = {
    "ct-head-ich-deepmedic": "triage.pipelines.ich:IchPipeline",
    "xr-chest-classifier": "triage.pipelines.radiograph:ChestRadiographPipeline",
}


class ModelPipeline(ABC):
    """Preprocess a series, run the model's ONNX members on it, and turn the outputs into findings."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    @abstractmethod
    def load(self, series: SeriesInfo, source: InstanceSource | None = None) -> Any:
        """Read the series' pixels (timed as the "load" stage) by their keys (`series.files`) from `source`: the
        store, or the series' bytes fetched from it onto this node (None: the keys are file paths).

        `preprocess` receives what this returns."""

    @abstractmethod
    def preprocess(self, series: Any) -> Any:
        """Build the model's input from what `load` returned (CPU work; picklable result).

        Raises:
            InvalidStudyError: when the series cannot be used (one slice, inconsistent geometry, no pixels).
            UnsupportedInputError: when the series is not something this model handles.
        """

    @abstractmethod
    def infer(self, prepared: Any, members: list[OnnxModel]) -> Any:
        """Run the loaded members on the prepared input (inside an inference worker)."""

    @abstractmethod
    def postprocess(self, prepared: Any, raw: Any, series: SeriesInfo) -> list[Finding]:
        """Turn raw outputs into study-level findings with probability, location and model version."""


def pipeline_for(card: ModelCard) -> ModelPipeline:
    """Instantiate the pipeline named by the card.

    Raises:
        ModelLoadError: when the card names a pipeline that triage does not have.
    """
    target = PIPELINES.get(card.pipeline)
    if target is None:
        raise ModelLoadError(f"{card.key}: unknown pipeline {card.pipeline!r}; known: {sorted(PIPELINES)}")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    pipeline: ModelPipeline = cls(card)
    return pipeline
