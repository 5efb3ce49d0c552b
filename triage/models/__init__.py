"""Model cards, the registry of installed models, the ONNX Runtime wrapper and network definitions."""
