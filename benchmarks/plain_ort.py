"""The baseline of issue 15: what a user would write to run a model over an image folder with onnxruntime.

Decodes every image with OpenCV, ImageNet preprocessing (RGB, /255, mean/std, NCHW), batches of ``--batch``,
plain onnxruntime with its default options. Prints images/s on stderr. Run as its own process beside
`scanner scan` (benchmarks/speed.py does).

    python benchmarks/plain_ort.py MODEL.onnx FOLDER [--batch 32] [--device cpu|cuda]
"""

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("folder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    start = time.perf_counter()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(args.model, providers=providers)
    name = session.get_inputs()[0].name
    files = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    preds = []
    for s in range(0, len(files), args.batch):
        imgs = [cv2.cvtColor(cv2.resize(cv2.imread(str(f)), (224, 224)), cv2.COLOR_BGR2RGB) for f in files[s : s + args.batch]]
        x = ((np.stack(imgs).astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2)
        preds.append(session.run(None, {name: np.ascontiguousarray(x)})[0].argmax(1))
    seconds = time.perf_counter() - start
    print(f"{len(files)} images in {seconds:.2f} s: {len(files) / seconds:.1f} img/s", file=sys.stderr)


if __name__ == "__main__":
    main()
