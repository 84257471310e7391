"""Build the small ONNX files of tests/test_coverage.py (dev only: needs torch + torchvision).

    /work/tvenv/bin/python tests/data/coverage/make.py [NAME ...]   # all files, or only these

Shrunken torchvision architectures with seeded random weights, one per export path the full matrix covers
(benchmarks/coverage.py). ``manifest.json`` records, per file, the export path and how many Conv2d / Linear
modules the torch model has (attention projections not counted: ``discover`` leaves them out).
"""

import json
import sys
import warnings
from pathlib import Path

import onnx
import torch
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.densenet import DenseNet
from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.vision_transformer import VisionTransformer

HERE = Path(__file__).resolve().parent
warnings.filterwarnings("ignore")


def mobilenet_v3_small():
    settings, last = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25)
    return MobileNetV3(settings, last, num_classes=10), 64


def vit_tiny():
    return VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10), 32


def regnet_tiny():
    params = BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return RegNet(params, num_classes=10, stem_width=8), 64


def convnext_tiny():
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10), 64


def densenet_tiny():
    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10), 64


class Uint8NHWC(torch.nn.Module):
    """uint8 (N, H, W, 3) input; /255 and ImageNet mean/std inside the graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.inner((x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std)


def counts(net):
    attention = {id(m.out_proj) for m in net.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    linears = sum(isinstance(m, torch.nn.Linear) and id(m) not in attention for m in net.modules())
    return convs, linears


def export(net, size, path, kind):
    names = dict(input_names=["x"], output_names=["logits"])
    x = torch.randn(2, 3, size, size)
    dyn = dict(dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}, external_data=False)
    legacy = dict(dynamo=False, dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    if kind == "dynamo":
        torch.onnx.export(net, (x,), str(path), **names, **dyn)
    elif kind == "legacy":
        torch.onnx.export(net, (x,), str(path), **names, **legacy, opset_version=17)
    elif kind == "legacy-bn":
        torch.onnx.export(net, (x,), str(path), **names, **legacy, opset_version=17, do_constant_folding=False)
    elif kind == "legacy-op13":
        torch.onnx.export(net, (x,), str(path), **names, **legacy, opset_version=13)
    elif kind == "static-b1":
        torch.onnx.export(net, (x[:1],), str(path), **names, dynamo=True, external_data=False)
    elif kind == "external":
        torch.onnx.export(net, (x,), str(path), **names, **{**dyn, "external_data": True})
    elif kind == "uint8-nhwc":
        xu = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
        torch.onnx.export(Uint8NHWC(net).eval(), (xu,), str(path), **names, **dyn)
    else:
        raise ValueError(kind)


FILES = [
    ("mobilenet_v3_small_dynamo", mobilenet_v3_small, "dynamo"),
    ("mobilenet_v3_small_legacy_op13", mobilenet_v3_small, "legacy-op13"),
    ("vit_tiny_dynamo", vit_tiny, "dynamo"),
    ("vit_tiny_legacy", vit_tiny, "legacy"),
    ("regnet_tiny_legacy_bn", regnet_tiny, "legacy-bn"),
    ("convnext_tiny_static_b1", convnext_tiny, "static-b1"),
    ("densenet_tiny_external", densenet_tiny, "external"),
    ("mobilenet_v3_small_uint8_nhwc", mobilenet_v3_small, "uint8-nhwc"),
    ("vit_tiny_legacy_bn", vit_tiny, "legacy-bn"),  # MatMul weights behind Transpose nodes (no constant folding)
]


def main(only=()):
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    for i, (name, build, kind) in enumerate(FILES):
        if only and name not in only:
            continue
        torch.manual_seed(i)
        net, size = build()
        net.eval()
        path = HERE / f"{name}.onnx"
        for old in (path, Path(str(path) + ".data")):
            old.unlink(missing_ok=True)
        export(net, size, path, kind)
        conv, linear = counts(net)
        opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))
        manifest[path.name] = {"path": kind, "conv2d": conv, "linear": linear, "opset": opset, "size": size}
        print(name, kind, f"opset {opset}", f"{path.stat().st_size / 1e6:.2f} MB", flush=True)
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


if __name__ == "__main__":
    print("torch", torch.__version__, "torchvision", torchvision.__version__)
    main(sys.argv[1:])
