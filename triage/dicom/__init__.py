"""The DICOM boundary: reading and sorting series, the storage SCP, STOW-RS parsing, the durable store."""
