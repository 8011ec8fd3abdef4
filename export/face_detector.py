"""MTCNN's three networks (P-, R-, O-Net) as torch modules, loaded from the weights facenet-pytorch ships,
exported to ONNX and checked against torch.

The layer names and shapes follow facenet-pytorch 2.6.0's ``data/{pnet,rnet,onet}.pt`` state dicts (the
weights of Zhang et al.'s MTCNN, converted from davidsandberg/facenet's TensorFlow port). The package itself
is never imported: its ``__init__`` needs torchvision; only its data folder is read.

Inputs are RGB, NCHW, float32, scaled as ``(pixel - 127.5) / 128``. Outputs:
- P-Net ``image [N, 3, H, W]`` (H, W >= 12, dynamic) -> ``box_offsets [N, 4, H', W']``, ``face_prob
  [N, 2, H', W']`` with ``H' = (H - 10) // 2 - 1`` (one cell per 12 px window, stride 2);
- R-Net ``image [N, 3, 24, 24]`` -> ``box_offsets [N, 4]``, ``face_prob [N, 2]``;
- O-Net ``image [N, 3, 48, 48]`` -> ``box_offsets [N, 4]``, ``landmarks [N, 10]`` (x of the 5 points, then
  y, as fractions of the box), ``face_prob [N, 2]``.
``face_prob[:, 1]`` is the face probability (a softmax inside the graph). runtime/faces.py runs them.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MissingDependencyError
from ..lazy import INSTALL_HINTS, require
from .onnx_export import save_onnx
from .validate import relative_error

NETS = ("pnet", "rnet", "onet")
INPUT = "image"
OUTPUTS = {"pnet": ("box_offsets", "face_prob"), "rnet": ("box_offsets", "face_prob"),
           "onet": ("box_offsets", "landmarks", "face_prob")}
CROP = {"rnet": 24, "onet": 48}          # the fixed input side of R- and O-Net
TOLERANCE = 1e-4                         # max relative error, ONNX against torch (fp32)
WEIGHTS_PACKAGE = "facenet_pytorch"


def weights_folder() -> Path:
    """facenet-pytorch's data folder (pnet.pt, rnet.pt, onet.pt), found without importing the package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) / "data" if spec and spec.submodule_search_locations else None
    if folder is None or not all((folder / f"{net}.pt").is_file() for net in NETS):
        raise MissingDependencyError(f"the MTCNN weights (facenet-pytorch's data/pnet.pt, rnet.pt, onet.pt) were "
                                     f"not found: {INSTALL_HINTS[WEIGHTS_PACKAGE][1]}")
    return folder


class PNet(nn.Module):
    """The proposal network: fully convolutional, a face probability and box offsets per 12 px window."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)     # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)     # box offsets

    def forward(self, image: torch.Tensor) -> tuple:
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, W*H*C] in the TensorFlow port's (W, H, C) order, which the dense weights expect."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """The refinement network: a 24x24 crop -> face probability and box offsets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, image: torch.Tensor) -> tuple:
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_transposed(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """The output network: a 48x48 crop -> face probability, box offsets and 5 landmarks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)      # face / not face
        self.dense6_2 = nn.Linear(256, 4)      # box offsets
        self.dense6_3 = nn.Linear(256, 10)     # landmarks: 5 x, then 5 y

    def forward(self, image: torch.Tensor) -> tuple:
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_transposed(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


MODULES = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def load_nets(folder: Path | None = None) -> dict:
    """{"pnet": PNet, "rnet": RNet, "onet": ONet} in eval mode with facenet-pytorch's weights (strict names)."""
    folder = folder or weights_folder()
    nets = {}
    for name, cls in MODULES.items():
        net = cls()
        net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True), strict=True)
        nets[name] = net.eval()
    return nets


def dynamic_axes(net: str) -> dict:
    """P-Net: batch, height and width; R-/O-Net: the batch (the number of candidate boxes)."""
    spatial = {0: "batch", 2: "height", 3: "width"} if net == "pnet" else {0: "batch"}
    return {INPUT: spatial, **{name: {0: "batch"} for name in OUTPUTS[net]}}


def example_input(net: str, rng: np.random.Generator) -> np.ndarray:
    """A fresh random input in the networks' range (-1..1): P-Net of random size, R-/O-Net a random batch."""
    if net == "pnet":
        shape = (1, 3, int(rng.integers(12, 160)), int(rng.integers(12, 160)))
    else:
        shape = (int(rng.integers(1, 33)), 3, CROP[net], CROP[net])
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def export_net(module: nn.Module, net: str, path: Path, opset: int, metadata: dict) -> Path:
    """Trace one network to ``path`` (TorchScript exporter, constant folding); returns the path."""
    onnx = require("onnx")
    sample = torch.from_numpy(example_input(net, np.random.default_rng(0)))
    raw = path.with_name(f".{path.name}.trace")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (sample,), str(raw), input_names=[INPUT], output_names=list(OUTPUTS[net]),
                          dynamic_axes=dynamic_axes(net), opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    model = onnx.load(str(raw))
    raw.unlink()
    (written,) = save_onnx(model, path, {**metadata, "branch": net})
    return written


def net_parity(module: nn.Module, net: str, path: Path, rng: np.random.Generator, trials: int = 3) -> dict:
    """ONNX Runtime (CPU) against torch on ``trials`` fresh random inputs: the worst max relative error."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, shapes = 0.0, []
    for _ in range(trials):
        image = example_input(net, rng)
        got = session.run(list(OUTPUTS[net]), {INPUT: image})
        with torch.no_grad():
            want = module(torch.from_numpy(image))
        worst = max([worst] + [relative_error(g, w.numpy()) for g, w in zip(got, want)])
        shapes.append(list(image.shape))
    return {"artifact": path.name, "branch": net, "precision": "fp32", "trials": trials,
            "provider": "CPUExecutionProvider", "input_shapes": shapes, "max_rel_err": worst, "limit": TOLERANCE,
            "passed": worst <= TOLERANCE}


def export_face_detector(folder: Path, opset: int, metadata: dict) -> dict:
    """Write ``folder/face_{pnet,rnet,onet}.onnx``; returns {net: path}."""
    nets = load_nets()
    folder.mkdir(parents=True, exist_ok=True)
    return {net: export_net(module, net, folder / f"face_{net}.onnx", opset, {**metadata, "precision": "fp32"})
            for net, module in nets.items()}
