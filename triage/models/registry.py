"""The registry of installed models: scans weights/<name>/<version>/card.json and checks weights by sha256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from triage.errors import ModelLoadError, NotFoundError
from triage.models.card import ModelCard, read_card


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def version_key(version: str) -> tuple[int | str, ...]:
    """A sort key for version strings: numeric parts compare as numbers ("1.10.0" after "1.9.0")."""
    return tuple(int(p) if p.isdigit() else p for p in version.replace("-", ".").split("."))


@dataclass(frozen=True)
class InstalledModel:
    """A card and the folder that holds its weights."""

    card: ModelCard
    directory: Path

    def weight_paths(self) -> list[Path]:
        return [self.directory / w.file for w in self.card.weights]

    def verify(self) -> None:
        """Check every weights file against the card's sha256.

        Raises:
            ModelLoadError: when a file is missing or its sha256 differs from the card's (refuse to run it).
        """
        for spec in self.card.weights:
            path = self.directory / spec.file
            if not path.is_file():
                raise ModelLoadError(f"{self.card.key}: weights file {path} is missing")
            actual = sha256_file(path)
            if actual != spec.sha256:
                raise ModelLoadError(
                    f"{self.card.key}: sha256 of {path.name} is {actual}, the card says {spec.sha256}; refusing to load"
                )


class ModelRegistry:
    """Installed models under one weights directory. `get(name)` gives the newest version of a name; which versions
    run at a site, and whether their flags raise priority there, is each version's state at that site
    (`triage.worklist.model_states`)."""

    def __init__(self, weights_dir: Path) -> None:
        self.weights_dir = Path(weights_dir)
        self._models: dict[str, dict[str, InstalledModel]] = {}
        self.problems: list[str] = []
        # Versions refused by this process (weights failing their sha256 while another version of the model is
        # usable), by "name@version", with the reason; kept across refreshes.
        self.excluded: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan the weights directory. Unreadable cards are recorded in `problems`, not raised."""
        self._models.clear()
        self.problems.clear()
        if not self.weights_dir.is_dir():
            return
        for card_path in sorted(self.weights_dir.glob("*/*/card.json")):
            try:
                card = read_card(card_path)
            except ModelLoadError as exc:
                self.problems.append(str(exc))
                continue
            if card.name != card_path.parent.parent.name or card.version != card_path.parent.name:
                self.problems.append(
                    f"{card_path}: card says {card.key}, folder says "
                    f"{card_path.parent.parent.name}@{card_path.parent.name}"
                )
                continue
            if card.key in self.excluded:
                self.problems.append(f"{card.key} refused: {self.excluded[card.key]}")
                continue
            self._models.setdefault(card.name, {})[card.version] = InstalledModel(card, card_path.parent)

    def exclude(self, model: InstalledModel, reason: str) -> None:
        """Refuse one version (its weights do not match its card) while the model's other versions serve on."""
        self.excluded[model.card.key] = reason
        self.refresh()

    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[InstalledModel]:
        return [self._models[n][v] for n in self.names() for v in sorted(self._models[n], key=version_key)]

    def get(self, name: str, version: str | None = None) -> InstalledModel:
        """The named model, at `version` or the newest installed.

        Raises:
            NotFoundError: when no such model or version is installed.
        """
        versions = self._models.get(name)
        if not versions:
            raise NotFoundError(f"no model named {name!r} is installed; installed: {self.names()}")
        if version is None:
            version = max(versions, key=version_key)
        if version not in versions:
            raise NotFoundError(f"model {name!r} has no version {version!r}; installed: {sorted(versions)}")
        return versions[version]
