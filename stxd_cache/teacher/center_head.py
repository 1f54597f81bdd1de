"""The CenterPoint head: the box contract shared by the LiDAR teacher and the camera students.

It takes any BEV feature map `(B, C, H, W)` on a `BEVGrid` (rows along y, columns along x) and knows nothing
about LiDAR. Per task (a group of classes) it predicts, with mmdet3d's module names:

- `heatmap (B, n_cls_task, H, W)`: class logits (sigmoid → centre probability);
- `reg (B, 2, H, W)`: sub-cell offset of the centre, in cells, in [0, 1) from the cell's lower corner;
- `height (B, 1, H, W)`: z of the box centre in metres;
- `dim (B, 3, H, W)`: log(w, l, h);
- `rot (B, 2, H, W)`: (sin yaw, cos yaw);
- `vel (B, 2, H, W)`: (vx, vy) in m/s.

Concatenated in that order, the regression maps are `pipelines.boxes.encode_boxes` with x, y replaced by the
sub-cell offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.boxes import BOX_DIM, CODE_DIM, bev_iou, decode_boxes, encode_boxes
from pipelines.classes import DETECTION_CLASSES
from pipelines.grid import BEVGrid
from stxd_cache.teacher.config import DecodeConfig, LossConfig, TargetConfig

#: Regression maps of every task, name → channels, in the order of the 10-d code.
REG_HEADS: dict[str, int] = {"reg": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2}
#: Initial heatmap bias: sigmoid(-2.19) ≈ 0.1, the usual focal-loss prior.
HEATMAP_INIT_BIAS = -2.19
NUM_CLASSES = len(DETECTION_CLASSES)

#: Outputs of one task head: `heatmap` and the `REG_HEADS` maps.
TaskPreds = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CenterTargets:
    """Training targets, one entry per task (K = `max_objs`)."""

    heatmaps: tuple[torch.Tensor, ...]
    """(B, n_cls_task, H, W) Gaussian heatmaps, 1.0 exactly at every object's centre cell."""
    codes: tuple[torch.Tensor, ...]
    """(B, K, 10) [dx, dy, z, log w, log l, log h, sin, cos, vx, vy] per object, zero padded; NaN vx, vy
    where the velocity is unknown."""
    indices: tuple[torch.Tensor, ...]
    """(B, K) int64 flat index row * W + col of each object's centre cell."""
    masks: tuple[torch.Tensor, ...]
    """(B, K) bool, True for real objects."""

    @property
    def num_objects(self) -> int:
        """Objects over all tasks and samples."""
        return int(sum(int(m.sum()) for m in self.masks))


@dataclass(frozen=True)
class DecodedBoxes:
    """Detections of one sample, best first."""

    boxes: torch.Tensor
    """(M, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame."""
    scores: torch.Tensor
    """(M,) heatmap probability of the box's class at its centre cell."""
    labels: torch.Tensor
    """(M,) int64 indices into `DETECTION_CLASSES`."""
    probs: torch.Tensor
    """(M, 10) probabilities of all classes (in `DETECTION_CLASSES` order) at the centre cell; 0 for classes
    no task predicts."""


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float) -> torch.Tensor:
    """CenterNet's radius (in cells) within which a shifted box keeps IoU ≥ `min_overlap` with the truth.

    height, width: (N,) box extents in cells. Returns (N,) float: the smallest of the three cases (both
    corners shifted inwards, outwards, or one of each).
    """
    hw, s = height * width, height + width
    r1 = (s + torch.sqrt(s**2 - 4 * hw * (1 - min_overlap) / (1 + min_overlap))) / 2
    r2 = (2 * s + torch.sqrt(4 * s**2 - 16 * (1 - min_overlap) * hw)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * s
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * (min_overlap - 1) * hw)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def _gaussian_kernel(radius: int) -> torch.Tensor:
    """(2r+1, 2r+1) Gaussian with sigma = diameter / 6 and exactly 1.0 at the centre."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    sigma = (2 * radius + 1) / 6
    return torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))


def _greedy_nms(order: np.ndarray, suppress: np.ndarray) -> np.ndarray:
    """Greedy NMS. order: (M,) candidates best first; suppress: (M, M) bool in the same order, True where a
    kept row removes the column. Returns the kept entries of `order`."""
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= suppress[i]
    return order[np.asarray(keep, dtype=np.int64)]


def circle_nms(centers: torch.Tensor, scores: torch.Tensor, radius: float) -> torch.Tensor:
    """Keep the best box of every cluster of centres closer than `radius` metres (CenterPoint's NMS).

    centers: (M, 2) x, y in metres; scores: (M,). Returns (K,) int64 indices of kept boxes, best first.
    """
    order = torch.argsort(scores, descending=True).cpu().numpy()
    c = centers.detach().cpu().double().numpy()[order]
    dist2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return torch.as_tensor(_greedy_nms(order, dist2 <= radius**2), device=scores.device)


def rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on the exact rotated BEV IoU (`pipelines.boxes.bev_iou`).

    boxes: (M, >=7) [x, y, z, w, l, h, yaw, ...]; scores: (M,). Returns (K,) int64 indices, best first.
    """
    order = torch.argsort(scores, descending=True).cpu().numpy()
    b = boxes.detach().cpu().double().numpy()[order]
    return torch.as_tensor(_greedy_nms(order, bev_iou(b, b) > iou_threshold), device=scores.device)


def boxes_from_codes(code: torch.Tensor, cells: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """Boxes (..., 9) from head codes (..., 10) [dx, dy, z, log w, log l, log h, sin, cos, vx, vy] read at flat
    cell indices `cells` (...,) = row · W + col of `grid`."""
    cols = grid.shape[1]
    cell_xy = torch.stack([cells % cols, cells // cols], dim=-1).to(code.dtype)
    lower = code.new_tensor([grid.x_range[0], grid.y_range[0]])
    xy = (cell_xy + code[..., :2]) * code.new_tensor(grid.cell_size) + lower
    return decode_boxes(torch.cat([xy, code[..., 2:]], dim=-1))


def codes_from_boxes(boxes: torch.Tensor, cells: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """Head codes (..., 10) [dx, dy, z, log w, log l, log h, sin, cos, vx, vy] of boxes (..., 9) relative to flat cell
    indices `cells` (...,) = row · W + col of `grid`: the inverse of `boxes_from_codes`, the regression targets of
    `build_targets` when `cells` holds each box's centre cell."""
    cols = grid.shape[1]
    cell_xy = torch.stack([cells % cols, cells // cols], dim=-1).to(boxes.dtype)
    offset = grid.world_to_cell(boxes[..., :2]) + 0.5 - cell_xy
    return torch.cat([offset, encode_boxes(boxes)[..., 2:]], dim=-1)


class ConvModule(nn.Module):
    """3x3 conv (no bias) / BatchNorm2d / ReLU with mmcv `ConvModule` names (`conv`, `bn`, `activate`)."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W). Returns (B, C_out, H, W)."""
        return self.activate(self.bn(self.conv(x)))


class SeparateHead(nn.Module):
    """One task: per output a stack of `ConvModule`s then a final 3x3 conv with bias (mmdet3d names)."""

    def __init__(self, *, in_channels: int, head_channels: int, num_classes: int, num_heatmap_convs: int) -> None:
        super().__init__()
        outputs = {**{name: (ch, 2) for name, ch in REG_HEADS.items()}, "heatmap": (num_classes, num_heatmap_convs)}
        finals: dict[str, nn.Conv2d] = {}
        for name, (channels, num_convs) in outputs.items():
            layers: list[nn.Module] = []
            c = in_channels
            for _ in range(num_convs - 1):
                layers.append(ConvModule(in_channels=c, out_channels=head_channels))
                c = head_channels
            finals[name] = nn.Conv2d(c, channels, 3, padding=1, bias=True)
            setattr(self, name, nn.Sequential(*layers, finals[name]))
        with torch.no_grad():
            cast(torch.Tensor, finals["heatmap"].bias).fill_(HEATMAP_INIT_BIAS)
        self.output_names = tuple(outputs)

    def forward(self, x: torch.Tensor) -> TaskPreds:
        """x: (B, C, H, W). Returns {name: (B, channels, H, W)} for `REG_HEADS` and `heatmap`."""
        return {name: getattr(self, name)(x) for name in self.output_names}


class CenterHead(nn.Module):
    """Shared conv, one `SeparateHead` per task, CenterPoint targets, losses and decoding."""

    def __init__(
        self,
        *,
        in_channels: int,
        tasks: Sequence[Sequence[str]],
        share_conv_channels: int,
        head_conv_channels: int,
        num_heatmap_convs: int,
        target: TargetConfig,
        loss: LossConfig,
        decode: DecodeConfig,
    ) -> None:
        """
        Args:
            in_channels: channels of the input BEV map.
            tasks: class names of each task, all in `DETECTION_CLASSES`, each class in at most one task.
            share_conv_channels, head_conv_channels: widths of the shared conv and of the separate heads.
            num_heatmap_convs: convs of every heatmap branch, the final one included.
            target, loss, decode: target assignment, loss weights and decoding settings.
        """
        super().__init__()
        self.in_channels = in_channels
        """C of the BEV the head reads."""
        self.tasks = tuple(tuple(t) for t in tasks)
        names = [c for t in self.tasks for c in t]
        if len(names) != len(set(names)) or not set(names) <= set(DETECTION_CLASSES):
            raise ValueError(f"tasks {self.tasks}: expected distinct class names among {DETECTION_CLASSES}")
        if decode.nms == "circle" and len(decode.nms_radius) != len(self.tasks):
            raise ValueError(f"circle NMS needs one radius per task ({len(self.tasks)}), got {decode.nms_radius}")
        self.target_cfg, self.loss_cfg, self.decode_cfg = target, loss, decode
        #: Global class indices of every task's heatmap channels.
        self.task_classes = tuple(tuple(DETECTION_CLASSES.index(c) for c in t) for t in self.tasks)
        self.shared_conv = ConvModule(in_channels=in_channels, out_channels=share_conv_channels)
        self.task_heads = nn.ModuleList(
            SeparateHead(in_channels=share_conv_channels, head_channels=head_conv_channels, num_classes=len(t),
                         num_heatmap_convs=num_heatmap_convs) for t in self.tasks)

    def forward(self, bev: torch.Tensor) -> list[TaskPreds]:
        """bev: (B, C, H, W) on the head's grid. Returns one `TaskPreds` per task (see the module doc)."""
        x = self.shared_conv(bev)
        return [head(x) for head in self.task_heads]

    def build_targets(self, gt_boxes: Sequence[torch.Tensor], gt_labels: Sequence[torch.Tensor],
                      grid: BEVGrid) -> CenterTargets:
        """Heatmaps and regression targets of a batch on `grid`; objects whose centre is off the grid,
        whose class no task predicts or whose size is not positive are skipped. An unknown (NaN) velocity stays
        NaN in the codes, and `loss` ignores it.

        gt_boxes: B tensors (N_i, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame;
        gt_labels: B tensors (N_i,) int indices into `DETECTION_CLASSES`. Targets are on the device of the
        boxes.
        """
        if len(gt_boxes) != len(gt_labels):
            raise ValueError(f"{len(gt_boxes)} box tensors but {len(gt_labels)} label tensors")
        (rows, cols), n_tasks, k = grid.shape, len(self.tasks), self.target_cfg.max_objs
        device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
        task_of = torch.full((NUM_CLASSES,), -1, dtype=torch.int64)
        local_of = torch.zeros(NUM_CLASSES, dtype=torch.int64)
        for t, ids in enumerate(self.task_classes):
            task_of[list(ids)] = t
            local_of[list(ids)] = torch.arange(len(ids))
        batch = len(gt_boxes)
        heatmaps = [torch.zeros(batch, len(ids), rows, cols) for ids in self.task_classes]
        codes = torch.zeros(n_tasks, batch, k, CODE_DIM)
        indices = torch.zeros(n_tasks, batch, k, dtype=torch.int64)
        masks = torch.zeros(n_tasks, batch, k, dtype=torch.bool)
        cell = torch.tensor(grid.cell_size, dtype=torch.float64)
        for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
            boxes = boxes.detach().cpu().double().reshape(-1, BOX_DIM)
            labels = labels.detach().cpu().long().reshape(-1)
            # Continuous cell coordinates from the grid's lower corner: cell (c, r) spans [c, c+1) x [r, r+1).
            uv = grid.world_to_cell(boxes[:, :2]) + 0.5
            centre = torch.floor(uv).long()
            known = (labels >= 0) & (labels < NUM_CLASSES)
            task = torch.where(known, task_of[labels.clamp(0, NUM_CLASSES - 1)], -1)
            valid = ((task >= 0) & (centre[:, 0] >= 0) & (centre[:, 0] < cols) & (centre[:, 1] >= 0)
                     & (centre[:, 1] < rows) & (boxes[:, 3:6] > 0).all(1) & torch.isfinite(boxes[:, :7]).all(1))
            code = torch.cat([uv - centre, encode_boxes(boxes)[:, 2:]], dim=1)
            radius = gaussian_radius(boxes[:, 4] / cell[1], boxes[:, 3] / cell[0], self.target_cfg.gaussian_overlap)
            radius = radius.floor().clamp(min=self.target_cfg.min_radius).long()
            for t in range(n_tasks):
                sel = torch.nonzero(valid & (task == t)).flatten()[:k]
                n = len(sel)
                codes[t, b, :n] = code[sel].float()
                indices[t, b, :n] = centre[sel, 1] * cols + centre[sel, 0]
                masks[t, b, :n] = True
                for i in sel.tolist():
                    r, (c0, r0), ch = int(radius[i]), centre[i].tolist(), int(local_of[labels[i]])
                    top, bottom, left, right = min(r0, r), min(rows - r0, r + 1), min(c0, r), min(cols - c0, r + 1)
                    patch = _gaussian_kernel(r)[r - top:r + bottom, r - left:r + right]
                    window = heatmaps[t][b, ch, r0 - top:r0 + bottom, c0 - left:c0 + right]
                    heatmaps[t][b, ch, r0 - top:r0 + bottom, c0 - left:c0 + right] = torch.maximum(window, patch)
        return CenterTargets(
            heatmaps=tuple(h.to(device) for h in heatmaps), codes=tuple(codes.to(device).unbind(0)),
            indices=tuple(indices.to(device).unbind(0)), masks=tuple(masks.to(device).unbind(0)))

    @staticmethod
    def regression_maps(preds: TaskPreds) -> torch.Tensor:
        """The `REG_HEADS` maps of one task concatenated: (B, 10, H, W) in code order."""
        return torch.cat([preds[name] for name in REG_HEADS], dim=1)

    def loss(self, preds: Sequence[TaskPreds], targets: CenterTargets) -> dict[str, torch.Tensor]:
        """Weighted loss terms summed over tasks, each normalised by the task's number of objects (≥ 1).

        `loss_heatmap`: CenterNet's Gaussian focal loss (alpha 2, beta 4) on the heatmap logits.
        `loss_bbox`: L1 between the regression maps at the centre cells and the codes, × `code_weights`;
        NaN code entries (unknown velocities) get weight 0.
        """
        if len(preds) != len(self.tasks):
            raise ValueError(f"got predictions of {len(preds)} tasks, expected {len(self.tasks)}")
        first = preds[0]["heatmap"]
        loss_heatmap, loss_bbox = first.new_zeros(()), first.new_zeros(())
        weights = first.new_tensor(self.target_cfg.code_weights)
        for t, p in enumerate(preds):
            logits = p["heatmap"]
            heat = targets.heatmaps[t].to(logits.device, logits.dtype)
            mask = targets.masks[t].to(logits.device)
            num = mask.sum().clamp(min=1).to(logits.dtype)
            prob, pos = torch.sigmoid(logits), heat.eq(1.0)
            pos_term = F.logsigmoid(logits) * (1 - prob) ** 2
            neg_term = F.logsigmoid(-logits) * prob**2 * (1 - heat) ** 4
            loss_heatmap = loss_heatmap - torch.where(pos, pos_term, neg_term).sum() / num
            reg = self.regression_maps(p).flatten(2)  # (B, 10, H*W)
            index = targets.indices[t].to(logits.device)
            pred = reg.gather(2, index[:, None, :].expand(-1, CODE_DIM, -1)).transpose(1, 2)  # (B, K, 10)
            code = targets.codes[t].to(pred.device, pred.dtype)
            known = mask[..., None] & ~torch.isnan(code)
            error = torch.where(known, (pred - torch.nan_to_num(code)).abs() * weights, 0.0)
            loss_bbox = loss_bbox + error.sum() / num
        return {"loss_heatmap": self.loss_cfg.heatmap_weight * loss_heatmap,
                "loss_bbox": self.loss_cfg.bbox_weight * loss_bbox}

    def class_probs(self, preds: Sequence[TaskPreds]) -> torch.Tensor:
        """(B, 10, H·W) sigmoid heatmaps in `DETECTION_CLASSES` order; 0 for classes no task predicts."""
        first = preds[0]["heatmap"]
        probs = first.new_zeros(first.shape[0], NUM_CLASSES, first.shape[2] * first.shape[3])
        for ids, p in zip(self.task_classes, preds, strict=True):
            probs[:, list(ids)] = torch.sigmoid(p["heatmap"]).flatten(2)
        return probs

    def read_at(self, preds: Sequence[TaskPreds], grid: BEVGrid, boxes: torch.Tensor, labels: torch.Tensor,
                valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's prediction at the centre cell of each given box (π of response distillation), with
        gradients: the box decoded there from the regression maps of the task of the box's class, and the class
        probabilities there.

        preds: one `TaskPreds` per task on `grid`; boxes: (B, M, 9) in the keyframe LiDAR frame; labels: (B, M)
        class indices; valid: (B, M) bool. Returns boxes (B, M, 9), probabilities (B, M, 10), and `valid`
        narrowed to boxes whose centre cell is on the grid and whose class a task predicts.
        """
        codes, cells, probs, valid = self.read_codes_at(preds, grid, boxes, labels, valid)
        return boxes_from_codes(codes, cells, grid), probs, valid

    def read_codes_at(self, preds: Sequence[TaskPreds], grid: BEVGrid, boxes: torch.Tensor, labels: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`read_at` before decoding: the raw regression codes (B, M, 10) at each box's centre cell (what the box
        loss compares with `codes_from_boxes`), the flat cell indices (B, M) = row · W + col, the class
        probabilities (B, M, 10) and the narrowed `valid` (B, M)."""
        rows, cols = grid.shape
        cell = torch.floor(grid.world_to_cell(boxes[..., :2].float()) + 0.5).long()        # (B, M, 2) col, row
        on_grid = (cell[..., 0] >= 0) & (cell[..., 0] < cols) & (cell[..., 1] >= 0) & (cell[..., 1] < rows)
        task_of = torch.full((NUM_CLASSES,), -1, dtype=torch.long, device=boxes.device)
        for t, ids in enumerate(self.task_classes):
            task_of[list(ids)] = t
        task = task_of[labels.clamp(0, NUM_CLASSES - 1)]
        valid = valid & on_grid & (labels >= 0) & (task >= 0)
        cells = cell[..., 1].clamp(0, rows - 1) * cols + cell[..., 0].clamp(0, cols - 1)   # (B, M)
        reg = torch.stack([self.regression_maps(p).flatten(2) for p in preds], 1)           # (B, T, 10, H·W)
        codes = reg.gather(3, cells[:, None, None, :].expand(-1, reg.shape[1], CODE_DIM, -1))
        codes = codes.gather(1, task.clamp(min=0)[:, None, None, :].expand(-1, 1, CODE_DIM, -1))[:, 0]
        probs = self.class_probs(preds)
        probs = probs.gather(2, cells[:, None, :].expand(-1, NUM_CLASSES, -1)).transpose(1, 2)
        return codes.transpose(1, 2), cells, probs, valid

    @torch.no_grad()
    def decode(self, preds: Sequence[TaskPreds], grid: BEVGrid) -> list[DecodedBoxes]:
        """Boxes per sample: top `pre_max_per_task` centres per task, score threshold, NMS per task (circle
        with the task's radius, or rotated IoU), then the best `post_max` over all tasks.

        preds: one `TaskPreds` per task with maps (B, ·, H, W) on `grid`.
        """
        rows, cols = grid.shape
        first = preds[0]["heatmap"]
        if tuple(first.shape[-2:]) != (rows, cols):
            raise ValueError(f"head maps of size {tuple(first.shape[-2:])} do not match grid {grid.describe()}")
        batch, device, cfg = first.shape[0], first.device, self.decode_cfg
        probs = self.class_probs(preds)
        per_sample: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(batch)]
        for t, (ids, p) in enumerate(zip(self.task_classes, preds, strict=True)):
            heat = probs[:, list(ids)].flatten(1)  # (B, n_cls * H * W)
            scores, flat = heat.topk(min(cfg.pre_max_per_task, heat.shape[1]), dim=1)
            cls, cells = flat // (rows * cols), flat % (rows * cols)
            reg = self.regression_maps(p).flatten(2)
            code = reg.gather(2, cells[:, None, :].expand(-1, CODE_DIM, -1)).transpose(1, 2)  # (B, k, 10)
            boxes = boxes_from_codes(code, cells, grid)
            labels = torch.as_tensor(ids, device=device)[cls]
            for b in range(batch):
                keep = torch.nonzero(scores[b] > cfg.score_threshold).flatten()
                bx, sc = boxes[b, keep], scores[b, keep]
                if cfg.nms == "circle":
                    kept = keep[circle_nms(bx[:, :2], sc, cfg.nms_radius[t])]
                else:
                    kept = keep[rotated_nms(bx, sc, cfg.nms_iou)]
                per_sample[b].append((boxes[b, kept], scores[b, kept], labels[b, kept],
                                      probs[b, :, cells[b, kept]].T))
        out = []
        for parts in per_sample:
            boxes, scores, labels, cls_probs = (torch.cat(x) for x in zip(*parts, strict=True))
            best = torch.argsort(scores, descending=True)[: cfg.post_max]
            out.append(DecodedBoxes(boxes=boxes[best], scores=scores[best], labels=labels[best],
                                    probs=cls_probs[best]))
        return out
