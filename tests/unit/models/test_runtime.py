"""The ONNX Runtime wrapper: providers from settings and the card, the fp16 and bf16 parity checks, batching by the
graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from triage.config import DeploymentSettings, RaySettings, Settings
from triage.models.card import read_card, write_card
from triage.models.registry import ModelRegistry
from triage.models.runtime import (
    OnnxModel,
    available_providers,
    cpu_has_bf16,
    load_members,
    parity_gap,
    parity_probe,
    provider_options,
)


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


def test_openvino_gets_its_precision_and_threads_explicitly() -> None:
    [(name, options)] = provider_options(["OpenVINOExecutionProvider"], False)
    assert name == "OpenVINOExecutionProvider" and "num_of_threads" not in options
    assert json.loads(options["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
    [(_, options)] = provider_options(["OpenVINOExecutionProvider"], False, bf16=True, threads=1)
    assert json.loads(options["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}
    assert options["num_of_threads"] == "1"


def test_bf16_units_are_read_from_the_cpu_flags(tmp_path: Path) -> None:
    amx, older = tmp_path / "amx", tmp_path / "older"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    older.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_has_bf16(amx) and not cpu_has_bf16(older)
    assert not cpu_has_bf16(tmp_path / "absent")


def test_bf16_runs_only_where_the_card_allows_it_and_the_cpu_has_the_units(tmp_path: Path) -> None:
    if "OpenVINOExecutionProvider" not in available_providers(["OpenVINOExecutionProvider"]):
        pytest.skip("onnxruntime-openvino is not installed")
    shipped = sorted(p for p in (Settings().weights_dir / "xr-chest-pneumothorax").iterdir() if p.is_dir())[-1]
    folder = tmp_path / "xr-chest-pneumothorax" / shipped.name
    shutil.copytree(shipped, folder)
    providers = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]

    def _precision(allowed: bool, tolerance: float) -> str:
        card = read_card(folder / "card.json")
        runtime = card.runtime.model_copy(update={"bf16": allowed, "bf16_parity_tolerance": tolerance})
        write_card(card.model_copy(update={"runtime": runtime}), folder / "card.json")
        [member] = load_members(ModelRegistry(tmp_path).get("xr-chest-pneumothorax"), providers, bf16=True)
        return member.precision

    assert _precision(allowed=False, tolerance=1.0) == "fp32"  # the card does not allow it
    assert _precision(allowed=True, tolerance=1.0) == ("bf16" if cpu_has_bf16() else "fp32")
