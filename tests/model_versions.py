"""Another version of an installed model for the tests: a copy of one version's folder with its own card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def copy_version(model_dir: Path, version: str, source: str = "1.0.0", **card_changes: Any) -> Path:
    """Install `model_dir/source` again as `model_dir/version` (same weights, card version and `card_changes`)."""
    target = model_dir / version
    shutil.copytree(model_dir / source, target)
    card = json.loads((target / "card.json").read_text())
    card.update(version=version, **card_changes)
    (target / "card.json").write_text(json.dumps(card))
    return target
