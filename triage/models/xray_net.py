"""A small 2-D DenseNet (MONAI) for frontal chest radiographs that also returns a class activation map."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from triage.errors import MissingDependencyError

# Network hyper-parameters; the card's provenance.network holds the values a shipped model was built with.
DEFAULT_NETWORK: dict[str, Any] = {
    "architecture": "monai.networks.nets.DenseNet features + 1x1 conv class activation head",
    "in_channels": 1,
    "init_features": 16,
    "growth_rate": 8,
    "block_config": [4, 6, 8],
    "bn_size": 4,
    "dropout_prob": 0.0,
    # How the class activation map becomes the logit: "mean" (classic CAM) or "lse", a log-sum-exp smooth
    # maximum with sharpness lse_r, which suits a finding that covers a small part of the image.
    "pooling": "mean",
    "lse_r": 4.0,
}


def network_params(card_or_params: Any = None) -> dict[str, Any]:
    """The network hyper-parameters from a ModelCard (provenance.network), a mapping, or the defaults.

    Raises:
        ValueError: when a parameter is unknown or has the wrong form.
    """
    if card_or_params is None:
        given: Mapping[str, Any] = {}
    elif isinstance(card_or_params, Mapping):
        given = card_or_params
    else:  # a ModelCard
        given = dict(getattr(card_or_params, "provenance", {}) or {}).get("network", {})
    unknown = set(given) - set(DEFAULT_NETWORK)
    if unknown:
        raise ValueError(f"unknown network parameter(s) {sorted(unknown)}; known: {sorted(DEFAULT_NETWORK)}")
    params = {**DEFAULT_NETWORK, **given}
    block_config = params["block_config"]
    if not isinstance(block_config, list | tuple) or not block_config or not all(int(b) > 0 for b in block_config):
        raise ValueError(f"block_config={block_config!r}; expected a non-empty list of positive layer counts")
    params["block_config"] = [int(b) for b in block_config]
    if params["pooling"] not in ("mean", "lse"):
        raise ValueError(f"pooling={params['pooling']!r}; valid: 'mean', 'lse'")
    if float(params["lse_r"]) <= 0:
        raise ValueError(f"lse_r={params['lse_r']!r} must be positive")
    return params


def heatmap_stride(params: Mapping[str, Any]) -> int:
    """Input pixels per heatmap pixel: 4 from the stem (stride-2 conv, stride-2 pool), 2 per transition."""
    return 4 * 2 ** (len(params["block_config"]) - 1)


def build_xray_net(card_or_params: Any = None) -> Any:
    """Build the network (untrained) from a card, a parameter mapping or the defaults.

    The model maps a batch (N, 1, H, W) of normalised radiographs to two outputs:
    `logit` (N, 1), the pneumothorax logit, and `heatmap` (N, 1, H/s, W/s), the class activation map in logit
    units, where s = `heatmap_stride(params)`. The logit is a pooling of the heatmap (its mean, or a log-sum-exp
    smooth maximum), so the map shows exactly where the evidence for the score lies (class activation mapping,
    Zhou et al. 2016; log-sum-exp pooling, Pinheiro and Collobert 2015).

    Raises:
        MissingDependencyError: when torch or monai is not installed.
        ValueError: for bad parameters.
    """
    try:
        import torch
        from monai.networks.nets import DenseNet
    except ImportError as exc:  # pragma: no cover - torch and monai are core dependencies
        raise MissingDependencyError("torch/monai", "train") from exc

    params = network_params(card_or_params)
    lse_r = float(params["lse_r"]) if params["pooling"] == "lse" else None

    class XrayNet(torch.nn.Module):
        """DenseNet features, then a 1x1 convolution to one class map; logit = pooling of the map."""

        def __init__(self) -> None:
            super().__init__()
            densenet = DenseNet(
                spatial_dims=2,
                in_channels=int(params["in_channels"]),
                out_channels=1,
                init_features=int(params["init_features"]),
                growth_rate=int(params["growth_rate"]),
                block_config=tuple(params["block_config"]),
                bn_size=int(params["bn_size"]),
                dropout_prob=float(params["dropout_prob"]),
            )
            self.features = densenet.features
            channels = int(densenet.class_layers.out.in_features)  # type: ignore[union-attr,arg-type]
            self.act = torch.nn.ReLU()
            self.cam = torch.nn.Conv2d(channels, 1, kernel_size=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            heatmap = self.cam(self.act(self.features(x)))
            if lse_r is None:
                logit = heatmap.mean(dim=(2, 3))
            else:
                # log(mean(exp(r * h))) / r: between the mean (r -> 0) and the maximum (r -> inf) of the map.
                cells = heatmap.shape[2] * heatmap.shape[3]
                logit = (torch.logsumexp(lse_r * heatmap.flatten(2), dim=2) - math.log(cells)) / lse_r
            return logit, heatmap

    return XrayNet()
