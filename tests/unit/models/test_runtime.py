"""The ONNX Runtime wrapper: providers from settings and the card, the fp16 parity check, batching by the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from triage.config import DeploymentSettings, RaySettings
from triage.models.runtime import OnnxModel, available_providers, parity_gap, parity_probe, provider_options


def _scale_graph(path: Path, factor: float, batch: int | str = "batch") -> Path:
    """ONNX: y = factor * x on (batch, 4)."""
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [factor])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "scale", [inp], [out], initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_cpu_is_always_last_and_the_card_limits_the_choice() -> None:
    assert available_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])[-1] == "CPUExecutionProvider"
    # A card that allows only the CPU provider never gets another one, whatever the settings prefer.
    chosen = available_providers(["OpenVINOExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]


def test_tensorrt_gets_fp16_and_its_engine_cache_only_when_asked() -> None:
    configured = provider_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], True, "/cache")
    assert configured[0] == (
        "TensorrtExecutionProvider",
        {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": "/cache"},
    )
    assert configured[1] == "CPUExecutionProvider"
    assert provider_options(["TensorrtExecutionProvider"], False)[0][1] == {"trt_fp16_enable": False}


def test_parity_gap_measures_the_largest_output_difference(tmp_path: Path) -> None:
    reference = OnnxModel.load(_scale_graph(tmp_path / "a.onnx", 1.0), ["CPUExecutionProvider"])
    close = OnnxModel.load(_scale_graph(tmp_path / "b.onnx", 1.001), ["CPUExecutionProvider"])
    probe = parity_probe([None, 4])
    assert probe.shape == (1, 4) and np.abs(probe).max() <= 1.0
    assert parity_gap(reference, reference, probe) == 0.0
    assert 0.0 < parity_gap(close, reference, probe) <= 0.001 + 1e-7


def test_items_run_in_one_batch_or_as_the_graph_fixes_it(tmp_path: Path) -> None:
    dynamic = OnnxModel.load(_scale_graph(tmp_path / "d.onnx", 2.0), ["CPUExecutionProvider"])
    fixed = OnnxModel.load(_scale_graph(tmp_path / "f.onnx", 2.0, batch=1), ["CPUExecutionProvider"])
    assert dynamic.fixed_batch is None and fixed.fixed_batch == 1
    items = [np.full(4, i, dtype=np.float32) for i in range(5)]
    for model in (dynamic, fixed):
        outputs = model.run_items(items)
        assert [float(o["y"][0]) for o in outputs] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_a_model_deployment_override_keeps_the_common_settings() -> None:
    settings = RaySettings(
        deployment=DeploymentSettings(max_batch_size=8, max_ongoing_requests=6),
        deployments={"ct-head-ich": DeploymentSettings(max_replicas=3)},
    )
    ct = settings.deployment_for("ct-head-ich")
    assert (ct.max_replicas, ct.max_batch_size, ct.max_ongoing_requests) == (3, 8, 6)
    assert settings.deployment_for("xr-chest-pneumothorax").max_replicas == 1
