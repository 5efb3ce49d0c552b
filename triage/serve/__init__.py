"""The FastAPI service: routes, DICOMweb, and the watcher that sends complete studies to the pipeline."""
