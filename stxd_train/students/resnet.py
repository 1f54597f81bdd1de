"""ResNet image backbone for the camera students, with torchvision's state-dict layout.

The parameter names and, at `base_channels=64`, the shapes are those of torchvision's `resnet18/34/50/101`
without `fc`, so ImageNet checkpoints load with `load_pretrained`. `num_stages` truncates the network and
`base_channels` below 64 shrinks every width for cheap CPU runs (such networks have no ImageNet weights).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from pipelines.errors import ConfigError

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "load_pretrained"]

_MAX_LISTED = 8


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, *, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, inplanes, H, W) -> (B, planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as torchvision's v1.5) -> 1x1 convolutions with a residual (ResNet-50/101)."""

    expansion = 4

    def __init__(self, *, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, inplanes, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_ARCH: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """Multi-scale image features from a (possibly truncated or narrowed) torchvision-layout ResNet.

    Parameters
    ----------
    depth : one of 18, 34, 50, 101.
    num_stages : residual stages kept, 1..4 (`layer1`..`layer{num_stages}`).
    out_indices : 0-based stages whose outputs `forward` returns, each < `num_stages`, increasing.
    base_channels : width of the stem and of stage 0; 64 is torchvision's, smaller values scale every width.
    frozen_stages : -1 freezes nothing, 0 the stem (`conv1`, `bn1`), i the stem and `layer1`..`layer{i}`;
        frozen parameters get `requires_grad=False` and their BatchNorms stay in eval mode.
    norm_eval : keep every BatchNorm in eval mode (running statistics fixed) even in `train()`.
    """

    def __init__(self, *, depth: int = 18, num_stages: int = 4, out_indices: tuple[int, ...] = (2, 3),
                 base_channels: int = 64, frozen_stages: int = -1, norm_eval: bool = False) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth: found {depth}, expected one of {sorted(_ARCH)}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"ResNet num_stages: found {num_stages}, expected 1..4")
        out_indices = tuple(out_indices)
        if (not out_indices or any(not 0 <= i < num_stages for i in out_indices)
                or list(out_indices) != sorted(set(out_indices))):
            raise ValueError(f"ResNet out_indices: found {out_indices}, expected distinct increasing stage "
                             f"indices in 0..{num_stages - 1} (num_stages {num_stages})")
        if base_channels < 1:
            raise ValueError(f"ResNet base_channels: found {base_channels}, expected >= 1 (64 for ImageNet weights)")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"ResNet frozen_stages: found {frozen_stages}, expected -1..{num_stages}")
        self.depth = depth
        self.num_stages = num_stages
        self.out_indices = out_indices
        self.base_channels = base_channels
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        block, layers = _ARCH[depth]
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = base_channels
        self._stage_channels: list[int] = []
        for i in range(num_stages):
            planes = base_channels * 2**i
            stage, inplanes = _make_stage(block, inplanes, planes, layers[i], stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            self._stage_channels.append(inplanes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.train()

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of each returned feature map, in `out_indices` order."""
        return tuple(self._stage_channels[i] for i in self.out_indices)

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride in input pixels of each returned feature map (4, 8, 16, 32 for stages 0..3)."""
        return tuple(4 * 2**i for i in self.out_indices)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1, *(getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1))]

    def train(self, mode: bool = True) -> ResNet:
        """Set training mode, keeping frozen stages' (and with `norm_eval`, all) BatchNorms in eval mode."""
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    # the base class, so that layers converted to SyncBatchNorm for DDP stay frozen too
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) normalised images -> one (B, out_channels[k], H / strides[k], W / strides[k]) map
        per entry of `out_indices` (sizes rounded up at each stride-2 step)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def _make_stage(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int,
                stride: int) -> tuple[nn.Sequential, int]:
    """One residual stage named as torchvision's `layerN`; returns it and its output channels."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    layers: list[nn.Module] = [block(inplanes=inplanes, planes=planes, stride=stride, downsample=downsample)]
    layers += [block(inplanes=out, planes=planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


def load_pretrained(model: ResNet, path: str | Path) -> dict[str, list[str]]:
    """Load a torchvision-layout ResNet checkpoint into `model`, strictly.

    The file may hold a bare state dict or a dict with a `state_dict` or `model` entry; `module.` and
    `backbone.` prefixes are stripped. `fc.*` and the stages a truncated `model` lacks are skipped and
    returned as `ignored`. Older torchvision checkpoints lack the BatchNorm `num_batches_tracked`
    counters; those keep the model's values. Anything else that does not fit raises `ConfigError`.

    Returns
    -------
    {"loaded": model keys set from the file, "ignored": file keys (prefixes stripped) skipped}
    """
    from stxd_train.students.pretrained import read_state

    obj = read_state(path, what="pretrained weights")

    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    misshaped: dict[str, str] = {}
    for raw_key, value in obj.items():
        key = str(raw_key)
        while key.startswith(("module.", "backbone.")):
            key = key.split(".", 1)[1]
        if key not in own:
            stage = re.match(r"layer(\d+)\.", key)
            dropped = key.startswith("fc.") or (stage is not None and int(stage.group(1)) > model.num_stages)
            (ignored if dropped else unexpected).append(key)
        elif not isinstance(value, torch.Tensor):
            misshaped[key] = f"{key} found a {type(value).__name__} expected a tensor {tuple(own[key].shape)}"
        elif value.shape != own[key].shape:
            misshaped[key] = f"{key} found {tuple(value.shape)} expected {tuple(own[key].shape)}"
        else:
            state[key] = value
    missing = [k for k in own if k not in state and k not in misshaped and not k.endswith(".num_batches_tracked")]

    if missing or unexpected or misshaped:
        parts = [f"{len(v)} {name} ({_listing(v)})"
                 for name, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("mis-shaped keys", list(misshaped.values()))) if v]
        hint = f"use a torchvision resnet{model.depth} checkpoint with base_channels 64"
        if model.base_channels != 64:
            hint += f" (ImageNet weights do not exist for base_channels {model.base_channels})"
        else:
            hint += ", or set depth to that of the checkpoint"
        raise ConfigError(f"pretrained weights {path} do not fit ResNet-{model.depth} (base_channels "
                          f"{model.base_channels}, num_stages {model.num_stages}): {'; '.join(parts)}; {hint}")
    model.load_state_dict(state, strict=False)
    return {"loaded": list(state), "ignored": ignored}


def _listing(items: list[str]) -> str:
    head = ", ".join(items[:_MAX_LISTED])
    return head if len(items) <= _MAX_LISTED else f"{head} and {len(items) - _MAX_LISTED} more"
