"""scanner: find and remove backdoors in ONNX image classifiers.

The package follows the pipeline (docs/ARCHITECTURE.md):

- :mod:`scanner.graph`     the ONNX file: load and validate, discover layers, instrument norms, surgery
- :mod:`scanner.data`      image sets, preprocessing, triggers, probes
- :mod:`scanner.runtime`   onnxruntime sessions and the one runner every forward pass goes through
- :mod:`scanner.context`   the model context a command makes once and passes down
- :mod:`scanner.detect`    norm statistics, the scan, trigger synthesis, the verdict, weights-only evidence
- :mod:`scanner.repair`    prune sweep, head refit, verification and writing
- :mod:`scanner.report`    tables, JSON, SARIF, the HTML audit
- :mod:`scanner.policy`    the deployment gate's policy and judgement
- :mod:`scanner.commands`  one module per command, composing the stages; :mod:`scanner.cli` parses flags
"""

__version__ = "0.1.0"

import os as _os

# Refuse decompression bombs before OpenCV allocates them (OpenCV reads this when it first decodes).
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))
