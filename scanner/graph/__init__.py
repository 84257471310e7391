"""The ONNX graph: load and validate a file, discover layers, instrument norms, edit weights."""
