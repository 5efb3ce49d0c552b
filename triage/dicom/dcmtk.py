"""Find dcmtk's command-line tools (storescu, storescp, echoscu), which the demo and tests use as real peers.

pynetdicom installs Python apps with the same names into the virtual environment's bin folder; they take other
options, so a plain PATH lookup can find the wrong program. dcmtk's own tools say "dcmtk" in `--version`.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

DCMTK_ENV = {"TCP_NODELAY": "1"}  # without it dcmtk's tools wait ~40 ms per instance on Nagle's algorithm


@functools.cache
def find_dcmtk(tool: str) -> str | None:
    """The path of dcmtk's `tool`, or None when dcmtk is not installed."""
    candidates = [Path("/usr/bin") / tool, Path("/usr/local/bin") / tool]
    found = shutil.which(tool)
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            version = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return str(path)
    return None
