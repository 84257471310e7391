"""scanner: find and remove backdoors in ONNX image classifiers.

The pipeline, one module per stage:

- :mod:`scanner.graph.model`      load and validate an ONNX file
- :mod:`scanner.graph.layers`     discover neuron layers (Conv, Gemm, MatMul) and where their channels are read
- :mod:`scanner.graph.instrument` add in-graph per-channel l-inf / l1 / l2 norms
- :mod:`scanner.runtime.session`    onnxruntime sessions on CPU or CUDA
- :mod:`scanner.data.images`       images, preprocessing, batches
- :mod:`scanner.data.triggers`   trigger files and how they are applied
- :mod:`scanner.detect.stats`      streaming per-channel statistics and scores
- :mod:`scanner.detect.scan`       measure norms on clean and probe images
- :mod:`scanner.graph.surgery`    zero channels / refit the head by graph surgery
- :mod:`scanner.repair.prune`     choose what to prune, refit, verify
- :mod:`scanner.commands.evaluate`   clean accuracy and attack success
"""

__version__ = "0.1.0"

import os as _os

# Refuse decompression bombs before OpenCV allocates them (OpenCV reads this when it first decodes).
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))
