"""The contract every model pipeline keeps, so that a runner (in-process or Ray) can execute any of them.

A pipeline is chosen by the `pipeline` field of a model's card; its stages run in different places:
`load`, `preprocess` and `postprocess` are CPU work (Ray tasks on any node), inference runs inside a model
replica that keeps the ONNX sessions loaded. Inference is split so that a replica can batch: `model_inputs` cuts
the prepared input into items of the graph's input shape (a radiograph, a CT tile), every member runs on batches
of items (from one study or several), `reduce_members` folds one item's outputs over the members, and `assemble`
builds the raw result from the folded items. What passes between stages must be picklable.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from triage.domain import Finding, SeriesInfo
from triage.errors import InferenceError, ModelLoadError
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
    def model_inputs(self, prepared: Any) -> tuple[list[np.ndarray], Any]:
        """Cut the prepared input into the items the graph takes, each without the batch axis.

        Returns:
            (items, context): the items in order, and what `assemble` needs to put their outputs back together.
        """

    @abstractmethod
    def reduce_members(self, outputs: list[dict[str, np.ndarray]]) -> Any:
        """Fold one item's outputs (one dict of output name -> array, batch axis removed, per member) into what
        `assemble` takes for that item.

        Raises:
            InferenceError: when a member's outputs are not what the card promises.
        """

    @abstractmethod
    def assemble(self, prepared: Any, context: Any, reduced: list[Any], members: Sequence[OnnxModel]) -> Any:
        """Build the raw result that `postprocess` takes from the folded outputs of every item, in order."""

    def infer(self, prepared: Any, members: list[OnnxModel], batch_size: int = 1) -> Any:
        """Run the loaded members on the prepared input in this process, `batch_size` items at a time.

        Raises:
            InferenceError: when no member is loaded, or a member fails or gives outputs the card does not promise.
        """
        if not members:
            raise InferenceError(f"{self.card.key}: no loaded model members to run")
        items, context = self.model_inputs(prepared)
        step = max(1, batch_size)
        reduced: list[Any] = []
        for start in range(0, len(items), step):
            reduced += run_members(members, items[start : start + step], self.reduce_members)
        return self.assemble(prepared, context, reduced, members)

    @abstractmethod
    def postprocess(self, prepared: Any, raw: Any, series: SeriesInfo) -> list[Finding]:
        """Turn raw outputs into study-level findings with probability, location and model version."""


def run_members(members: Sequence[OnnxModel], items: Sequence[np.ndarray], reduce: Any) -> list[Any]:
    """Run every member once over a batch of same-shaped items and fold each item's outputs over the members.

    Args:
        members: loaded ensemble members (the same graph input shape).
        items: arrays of the graph's input shape without the batch axis.
        reduce: the pipeline's `reduce_members`.

    Returns:
        One folded output per item, in order.

    Raises:
        InferenceError: when onnxruntime fails, or `reduce` refuses a member's outputs.
    """
    if not items:
        return []
    per_member = [member.run_items(items) for member in members]
    return [reduce([outputs[i] for outputs in per_member]) for i in range(len(items))]


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
