"""The online-teacher baseline (`stxd-train fit --teacher-online CKPT`): the frozen LiDAR teacher runs at every
step on the current keyframe and its K previous keyframes, as BEVDistill, UVTR-L2C, DistillBEV and UniDistill
do, and yields the same `TeacherBatch` that the cache's records collate into, so the distillation losses are
computed by the same code.

The fields follow extraction (`stxd_cache.extract` + `stxd_cache.schema.encode_record`): the teacher BEV is
resampled to the distillation grid, tokens are its P×P block means, and the boxes are the top M by score.
They stay float32 where the cache stores float16 (or int8), which bounds the cached/online difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from pipelines.grid import BEVGrid, resample
from stxd_cache.schema import bev_tokens, top_boxes
from stxd_train.data import LidarFrames, TeacherBatch

if TYPE_CHECKING:
    from stxd_cache.teacher.model import CenterPoint, TeacherOutput


class OnlineTeacher:
    """A frozen teacher and the cache layout it imitates. Not an `nn.Module` on purpose: its weights are neither
    trained, saved in student checkpoints, nor wrapped by DDP."""

    def __init__(self, *, model: CenterPoint, grid: BEVGrid, token_grid: int, box_capacity: int, k: int,
                 num_sweeps: int, point_range: Sequence[float]) -> None:
        self.model = model
        model.eval().requires_grad_(False)
        self.grid, self.token_grid, self.box_capacity = grid, token_grid, box_capacity
        self.frames = LidarFrames(k=k, num_sweeps=num_sweeps, point_range=tuple(float(v) for v in point_range))

    @property
    def channels(self) -> int:
        return int(self.model.head.in_channels)

    def _bev(self, points: list[torch.Tensor]) -> tuple[torch.Tensor, TeacherOutput]:
        out = self.model(points)
        return resample(out.bev.float(), self.model.bev_grid, self.grid), out

    @torch.no_grad()
    def records(self, points: Sequence[Sequence[torch.Tensor | None]]) -> TeacherBatch:
        """points[b][f]: (N, 5) LiDAR points of sample b's frame f (0: the keyframe, then previous keyframes
        nearest first; None where the frame does not exist). Returns the batch's records as a cache would give them."""
        device = next(self.model.parameters()).device
        batch = len(points)
        # Every sample has its keyframe (frame 0); past frames may be None.
        bev, out = self._bev([cast(torch.Tensor, p[0]).to(device) for p in points])
        tokens = bev_tokens(bev, self.token_grid)
        # The boxes a cache row keeps: the top M by score, padded (the cache's own code).
        tops = [top_boxes(d.boxes.cpu().numpy(), d.scores.cpu().numpy(), d.labels.cpu().numpy(), d.probs.cpu().numpy(),
                          self.box_capacity) for d in self.model.decode(out)]
        boxes, scores, labels, probs, count = (torch.from_numpy(np.stack([t[name] for t in tops])).to(device)
                                               for name in ("boxes", "scores", "labels", "probs", "count"))
        k = self.frames.k
        past_tokens = torch.zeros(batch, k, tokens.shape[1], tokens.shape[2], device=device)
        past_valid = torch.zeros(batch, k, dtype=torch.bool, device=device)
        slots = [(b, f) for b in range(batch) for f in range(1, min(k + 1, len(points[b])))
                 if points[b][f] is not None]
        if slots:
            past_bev, _ = self._bev([cast(torch.Tensor, points[b][f]).to(device) for b, f in slots])
            past = bev_tokens(past_bev, self.token_grid)
            for j, (b, f) in enumerate(slots):
                past_tokens[b, f - 1], past_valid[b, f - 1] = past[j], True
        return TeacherBatch(bev=bev, tokens=tokens, past_tokens=past_tokens, past_valid=past_valid, boxes=boxes,
                            scores=scores, labels=labels, probs=probs, count=count)

