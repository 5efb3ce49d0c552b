"""A real DICOM peer for tests: triage's own StorageSCP with a real store on a free port (a modality's or PACS's
counterpart), remembering what it indexed."""

from __future__ import annotations

from pathlib import Path

from triage.config import DicomSettings
from triage.dicom.scp import StorageSCP
from triage.dicom.store import DicomStore, StorePolicy
from triage.domain import InstanceMeta


class Receiver:
    """Stores what it receives under `root`; `metas` maps SOP Instance UID to what was indexed."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.metas: dict[str, InstanceMeta] = {}
        dicom = DicomSettings(port=0, bind_address="127.0.0.1", **settings)  # type: ignore[arg-type]
        self.store = DicomStore(root, "salt", self._index, policy=StorePolicy.from_settings(dicom))
        self.scp = StorageSCP(dicom, self.store.write)

    @property
    def port(self) -> int:
        return self.scp.port

    def _index(self, meta: InstanceMeta) -> bool:
        new = meta.sop_instance_uid not in self.metas
        self.metas[meta.sop_instance_uid] = meta
        return new
