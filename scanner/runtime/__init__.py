"""onnxruntime: sessions (CPU or CUDA) and the runner every stage runs pixels through."""
