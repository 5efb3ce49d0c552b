"""Check an installed model against its card: weights sha256, and the ONNX graph's inputs and outputs."""

from __future__ import annotations

from triage.errors import ModelLoadError
from triage.models.card import TensorSpec
from triage.models.registry import InstalledModel

_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
}


def _compare(kind: str, spec: TensorSpec, name: str, shape: list[object], dtype: str) -> list[str]:
    problems = []
    if spec.name != name:
        problems.append(f"{kind} is named {name!r} in the graph, {spec.name!r} in the card")
    graph_shape = [dim if isinstance(dim, int) else None for dim in shape]
    if len(graph_shape) != len(spec.shape):
        problems.append(f"{kind} has rank {len(graph_shape)} in the graph, {len(spec.shape)} in the card")
    else:
        for axis, (g, c) in enumerate(zip(graph_shape, spec.shape, strict=True)):
            if g is not None and c is not None and g != c:
                problems.append(f"{kind} axis {axis} is {g} in the graph, {c} in the card")
    if _ONNX_TYPES.get(dtype, dtype) != spec.dtype:
        problems.append(f"{kind} dtype is {_ONNX_TYPES.get(dtype, dtype)} in the graph, {spec.dtype} in the card")
    return problems


def validate_model(model: InstalledModel) -> list[str]:
    """Every way the installed model disagrees with its card (empty: it agrees). Loads each file on the CPU."""
    import onnxruntime as ort

    try:
        model.verify()
    except ModelLoadError as exc:
        return [str(exc)]
    card = model.card
    problems: list[str] = []
    if card.ensemble.members != len(card.weights):
        problems.append(f"card lists {len(card.weights)} weights files but ensemble.members is {card.ensemble.members}")
    if len(card.outputs.labels) == 0:
        problems.append("card lists no output labels")
    for path in model.weight_paths():
        if path.suffix != ".onnx":
            continue
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            problems.append(f"{path.name}: onnxruntime cannot load it: {exc}")
            continue
        graph_in = session.get_inputs()[0]
        graph_out = session.get_outputs()[0]
        problems += [
            f"{path.name}: {p}"
            for p in _compare("input", card.inputs.tensor, graph_in.name, graph_in.shape, graph_in.type)
        ]
        problems += [
            f"{path.name}: {p}"
            for p in _compare("output", card.outputs.tensor, graph_out.name, graph_out.shape, graph_out.type)
        ]
    return problems
