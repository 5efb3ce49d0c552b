"""triage: AI triage for teleradiology worklists (DICOM in, prioritised worklist out)."""

__version__ = "0.1.0"
