"""Export the BLAST-CT v1 ensemble (12 DeepMedic state dicts) to ONNX and write the ct-head-ich model card."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from triage.errors import MissingDependencyError, ModelLoadError
from triage.models.card import ModelCard, read_card, write_card
from triage.models.registry import sha256_file

log = logging.getLogger(__name__)

MODEL_NAME = "ct-head-ich"
MODEL_VERSION = "1.0.0"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# DeepMedic's unpadded convolutions shrink every axis by its receptive field minus one (README beside the weights).
RECEPTIVE_MARGIN = 80
CLASS_LABELS = ["background", "IPH", "EAH", "oedema", "IVH"]
# The committed card holds the measured figures and post-processing facts; an export refreshes shapes and sha256.
SHIPPED_CARD = Path(__file__).resolve().parents[2] / "weights" / MODEL_NAME / MODEL_VERSION / "card.json"


def _import_deepmedic() -> Any:
    try:
        from blast_ct.models.deepmedic import DeepMedic
    except ImportError as exc:  # blast-ct is a training/export extra
        raise MissingDependencyError("blast-ct", extra="train") from exc
    return DeepMedic


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", extra="train") from exc
    return torch


def member_sources(source_dir: Path) -> list[Path]:
    """The state-dict files `model_1.pt .. model_12.pt` in member order.

    Raises:
        ModelLoadError: when the folder holds no such files.
    """
    found = sorted(Path(source_dir).glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not found:
        raise ModelLoadError(f"no BLAST-CT state dicts (model_N.pt) in {source_dir}")
    return found


def load_deepmedic(state_dict_path: Path) -> Any:
    """Build `DeepMedic(1, 5)` and load one BLAST-CT state dict strictly, in eval mode.

    Raises:
        MissingDependencyError: when torch or blast-ct is not installed.
        ModelLoadError: when the state dict does not match the network.
    """
    torch = _torch()
    deepmedic_cls = _import_deepmedic()
    model = deepmedic_cls(1, len(CLASS_LABELS))
    # The files are legacy pickles of plain tensors from the authors' release; weights_only=True rejects them.
    state = torch.load(state_dict_path, map_location="cpu", weights_only=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{state_dict_path} does not match DeepMedic(1, 5): {exc}") from exc
    return model.eval()


def probability_network(model: Any) -> Any:
    """Wrap DeepMedic so that it returns per-voxel softmax probabilities, shape (1, 5, T-80, T-80, T-80)."""
    torch = _torch()

    class _Probabilities(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: Any) -> Any:
            logits, _ = self.net(image)
            return torch.softmax(logits, dim=1)

    return _Probabilities(model).eval()


def check_tile(tile: int) -> int:
    """Validate an input tile edge (voxels) for DeepMedic and return the output edge.

    Raises:
        ValueError: when DeepMedic's 5x and 3x pathways do not allow that size (it must be a multiple of 5, >= 90).
    """
    if tile < 90 or tile % 5:
        raise ValueError(f"tile {tile} is not a valid DeepMedic input edge; use a multiple of 5 from 90 (e.g. 150)")
    return tile - RECEPTIVE_MARGIN


def export_member(state_dict_path: Path, out_path: Path, tile: int) -> Path:
    """Export one member at the fixed input shape (1, 1, tile, tile, tile) as one self-contained ONNX file."""
    torch = _torch()
    check_tile(tile)
    net = probability_network(load_deepmedic(state_dict_path))
    dummy = torch.zeros((1, 1, tile, tile, tile), dtype=torch.float32)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            net,
            (dummy,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            external_data=False,
        )
    program.save(str(out_path), external_data=False)
    _check_single_file(out_path)
    return out_path


def _check_single_file(path: Path) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelLoadError(f"{path} refers to external data for {external[:3]}; the export must be self-contained")


def export_ich(source_dir: Path, out_dir: Path, tile: int, members: Sequence[int]) -> list[Path]:
    """Export BLAST-CT members to `out_dir/member_NN.onnx` and write `out_dir/card.json`.

    The card is refreshed from the existing card.json in `out_dir` (else the committed one), so the measured
    figures and post-processing facts survive a re-export; the tile size, tensor shapes and the sha256 of every
    file are rewritten from what was exported. A new tile size needs its figures measured again
    (benchmarks/bench_ich_tiles.py, `python -m triage.training.bench agreement`).

    Args:
        source_dir: folder with `model_1.pt .. model_12.pt` (weights-src/blast-ct-v1).
        out_dir: weights/ct-head-ich/<version>.
        tile: input edge in voxels (1 mm); the output edge is `tile - 80`.
        members: 1-based member numbers to export (e.g. range(1, 13)).

    Returns:
        The ONNX files written, in member order.

    Raises:
        MissingDependencyError: when torch or blast-ct is not installed (pip install 'triage[train]').
        ValueError: when `tile` or a member number is invalid.
    """
    sources = member_sources(source_dir)
    by_number = {int(p.stem.split("_")[1]): p for p in sources}
    bad = [m for m in members if m not in by_number]
    if bad:
        raise ValueError(f"members {bad} are not in {source_dir}; available: {sorted(by_number)}")
    out_dir = Path(out_dir)
    written = []
    for number in members:
        path = out_dir / f"member_{number:02d}.onnx"
        log.info("exporting member %d at tile %d -> %s", number, tile, path)
        written.append(export_member(by_number[number], path, tile))
    _copy_licence(Path(source_dir), out_dir.parent)
    _write_card(out_dir, tile)
    return written


def _copy_licence(source_dir: Path, model_dir: Path) -> None:
    licence = source_dir / "LICENSE"
    if licence.is_file():
        shutil.copyfile(licence, model_dir / "LICENSE")


def _write_card(out_dir: Path, tile: int) -> None:
    """Refresh the card's tensor shapes, tile and weights list from the ONNX files present in `out_dir`."""
    card_path = out_dir / "card.json"
    template = card_path if card_path.is_file() else SHIPPED_CARD
    if not template.is_file():
        raise ModelLoadError(f"no card template at {card_path} or {SHIPPED_CARD}; restore the committed card.json")
    card: ModelCard = read_card(template)
    out_edge = check_tile(tile)
    files = sorted(out_dir.glob("member_*.onnx"))
    raw = card.model_dump(mode="json")
    raw["inputs"]["tensor"] = {"name": INPUT_NAME, "shape": [1, 1, tile, tile, tile], "dtype": "float32"}
    raw["outputs"]["tensor"] = {
        "name": OUTPUT_NAME,
        "shape": [1, len(CLASS_LABELS), out_edge, out_edge, out_edge],
        "dtype": "float32",
    }
    raw["postprocessing"]["tile_input_voxels"] = tile
    raw["postprocessing"]["tile_output_voxels"] = out_edge
    raw["weights"] = [{"file": p.name, "sha256": sha256_file(p)} for p in files]
    raw["ensemble"]["members"] = len(files)
    raw["ensemble"]["default_cpu"] = min(raw["ensemble"]["default_cpu"], len(files))
    raw["ensemble"]["default_gpu"] = min(raw["ensemble"]["default_gpu"], len(files))
    write_card(ModelCard.model_validate(raw), card_path)
    log.info("wrote %s", json.dumps({"card": str(card_path), "members": len(files), "tile": tile}))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m triage.training.export_ich [--tile 110] [--members 1-12]` (the CLI's `triage models export`)."""
    import argparse

    from triage.config import REPO_ROOT

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=REPO_ROOT / "weights-src" / "blast-ct-v1")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "weights" / MODEL_NAME / MODEL_VERSION)
    parser.add_argument(
        "--tile", type=int, default=None, help="input edge in voxels (default: the committed card's tile)"
    )
    parser.add_argument("--members", default="1-12", help="e.g. 1-12 or 1,2,3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    tile = args.tile or int(read_card(SHIPPED_CARD).postprocessing["tile_input_voxels"])
    for path in export_ich(args.source, args.out, tile, parse_members(args.members)):
        print(path)


def parse_members(text: str) -> list[int]:
    """'1-12' or '1,3,5' -> member numbers.

    Raises:
        ValueError: when the text is neither form (quoted in the message).
    """
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-", 1))
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"members {text!r} must look like '1-12' or '1,2,3'") from exc


if __name__ == "__main__":
    main()
