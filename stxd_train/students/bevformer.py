"""A BEVFormer-style camera student: BEV queries that attend to the images and to their own past.

Each encoder layer (post-norm, as BEVFormer) is temporal self-attention → LayerNorm → spatial cross-attention
→ LayerNorm → FFN → LayerNorm. Both attentions are deformable: a query samples its values bilinearly at
learned offsets from reference points, with learned weights (pure torch `grid_sample`).

Choices where BEVFormer leaves freedom or where this student is smaller:
- Spatial cross-attention re-batches, as BEVFormer: each camera samples only the queries whose pillar it
  sees, with the reference points it does not see masked; a query's result is the sum over cameras divided
  by the number of cameras that see at least one of its pillar points.
- The previous BEV is warped into the current frame with the ego poses (`align_bev`) before attention,
  rather than shifting the reference points; queries without a previous frame attend to themselves twice,
  as BEVFormer does for a scene's first frame.
- The previous frames run through the whole student in eval mode without gradient, oldest first, each
  with its own predecessor's BEV.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.grid import BEVGrid
from stxd_cache.teacher.center_head import CenterHead
from stxd_train.students.common import CameraStudent, ImageEncoder, align_bev, bev_points, project


def _sample(value: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of value (M, C, H, W) at loc (M, Q, S, 2) in [0, 1] (x, y); returns (M, C, Q, S)."""
    return F.grid_sample(value, loc * 2 - 1, mode="bilinear", padding_mode="zeros", align_corners=False)


def _ring(heads: int, points: int) -> torch.Tensor:
    """(heads·points, 2) unit offsets evenly spread around a circle: every head and point looks elsewhere."""
    angles = torch.arange(heads * points, dtype=torch.float32) * (2 * torch.pi / (heads * points))
    return torch.stack([angles.cos(), angles.sin()], -1)


def _init_deformable(attn: SpatialCrossAttention | TemporalSelfAttention, offsets: torch.Tensor) -> None:
    """Start a deformable attention at fixed offsets (one pixel or cell from the reference) with equal weights."""
    nn.init.zeros_(attn.sampling_offsets.weight)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(offsets.flatten())
    nn.init.zeros_(attn.attention_weights.weight)
    nn.init.zeros_(attn.attention_weights.bias)


class CameraQueries(NamedTuple):
    """The BEV queries each camera sees (BEVFormer's re-batching): cross-attention samples only these.

    M is the largest count over cameras and samples; shorter lists are padded with query 0 and `seen` False.
    """

    queries: torch.Tensor   # (B, N, M) int64 query indices
    uv: torch.Tensor        # (B, N, M, Z, 2) pillar points in image fractions
    seen: torch.Tensor      # (B, N, M, Z) float: 1 where the camera sees the pillar point
    cameras: torch.Tensor   # (B, Q) float: cameras that see each query (at least 1)

    @classmethod
    def build(cls, uv: torch.Tensor, visible: torch.Tensor) -> CameraQueries:
        """uv: (B, N, Q, Z, 2), visible: (B, N, Q, Z) bool from `project`."""
        seen_any = visible.any(-1)                                                      # (B, N, Q)
        m = max(int(seen_any.sum(-1).max()), 1)
        index = torch.argsort((~seen_any).to(torch.int8), dim=-1, stable=True)[..., :m]
        z = uv.shape[3]
        uv = torch.gather(uv, 2, index[..., None, None].expand(-1, -1, -1, z, 2))
        seen = torch.gather(visible, 2, index[..., None].expand(-1, -1, -1, z)).to(uv.dtype)
        return cls(queries=index, uv=uv, seen=seen, cameras=seen_any.sum(1).clamp(min=1).to(uv.dtype))


class SpatialCrossAttention(nn.Module):
    """Each BEV query samples image features around the projections of its pillar points."""

    def __init__(self, *, embed_dims: int, num_heads: int, num_levels: int, num_heights: int, num_points: int,
                 dropout: float) -> None:
        super().__init__()
        self.heads, self.levels, self.heights, self.points = num_heads, num_levels, num_heights, num_points
        n = num_heads * num_levels * num_heights * num_points
        self.sampling_offsets = nn.Linear(embed_dims, n * 2)
        self.attention_weights = nn.Linear(embed_dims, n)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        ring = _ring(num_heads, num_points).view(num_heads, 1, 1, num_points, 2)
        _init_deformable(self, ring.expand(-1, num_levels, num_heights, -1, -1))

    def forward(self, query: torch.Tensor, feats: Sequence[torch.Tensor], views: CameraQueries) -> torch.Tensor:
        """query: (B, Q, C); feats: levels × (B, N, C, H_l, W_l); views: the queries each camera sees.
        Returns (B, Q, C)."""
        b, q, c = query.shape
        n, m, h, zp = views.queries.shape[1], views.queries.shape[2], self.heads, self.heights * self.points
        # Offsets and weights of the queries each camera sees: (B, N, M, ...).
        picked = torch.gather(query[:, None].expand(-1, n, -1, -1), 2, views.queries[..., None].expand(-1, -1, -1, c))
        offsets = self.sampling_offsets(picked).view(b, n, m, h, self.levels, self.heights, self.points, 2)
        weights = self.attention_weights(picked).view(b, n, m, h, -1).softmax(-1)
        weights = weights.view(b, n, m, h, self.levels, zp) * views.seen.repeat_interleave(self.points, -1)[
            :, :, :, None, None]
        out = None
        for lvl, feat in enumerate(feats):
            hl, wl = feat.shape[-2:]
            value = self.value_proj(feat.flatten(3).transpose(2, 3))                    # (B, N, HW, C)
            value = value.view(b, n, hl * wl, h, c // h).permute(0, 1, 3, 4, 2).reshape(b * n * h, c // h, hl, wl)
            off = offsets[:, :, :, :, lvl] / offsets.new_tensor([wl, hl])               # pixels → fractions
            loc = views.uv[:, :, :, None, :, None, :] + off                              # (B, N, M, h, Z, P, 2)
            loc = loc.permute(0, 1, 3, 2, 4, 5, 6).reshape(b * n * h, m, zp, 2)
            w = weights[:, :, :, :, lvl].permute(0, 1, 3, 2, 4).reshape(b * n * h, 1, m, zp)
            part = (_sample(value, loc) * w).sum(-1)                                     # (B·N·h, C/h, M)
            out = part if out is None else out + part
        assert out is not None   # every camera feature level was sampled
        # Back to the BEV: sum over the cameras, divided by the number of cameras that see the query.
        total = query.new_zeros(b, c, q).scatter_add_(
            2, views.queries.flatten(1)[:, None].expand(-1, c, -1),
            out.view(b, n, c, m).transpose(1, 2).flatten(2))
        return self.dropout(self.output_proj(total.transpose(1, 2) / views.cameras[..., None]))


class TemporalSelfAttention(nn.Module):
    """Each BEV query samples the aligned previous BEV and the current queries around its own cell."""

    def __init__(self, *, embed_dims: int, num_heads: int, num_points: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.points = num_heads, num_points
        self.sampling_offsets = nn.Linear(2 * embed_dims, num_heads * 2 * num_points * 2)
        self.attention_weights = nn.Linear(2 * embed_dims, num_heads * 2 * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        _init_deformable(self, _ring(num_heads, num_points).view(num_heads, 1, num_points, 2).expand(-1, 2, -1, -1))

    def forward(self, query: torch.Tensor, prev: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """query, prev: (B, Q, C) with Q = H·W in row-major order; shape: (H, W). Returns (B, Q, C)."""
        b, q, c = query.shape
        rows, cols, h = shape[0], shape[1], self.heads
        both = torch.cat([prev, query], dim=-1)
        offsets = self.sampling_offsets(both).view(b, q, h, 2, self.points, 2) / query.new_tensor([cols, rows])
        weights = self.attention_weights(both).view(b, q, h, 2, self.points).softmax(-1)
        value = self.value_proj(torch.stack([prev, query], dim=1))                       # (B, 2, Q, C)
        value = value.view(b, 2, rows, cols, h, c // h).permute(0, 1, 4, 5, 2, 3).reshape(b * 2 * h, c // h,
                                                                                          rows, cols)
        ys, xs = torch.meshgrid(torch.arange(rows, device=query.device), torch.arange(cols, device=query.device),
                                indexing="ij")
        ref = torch.stack([(xs + 0.5) / cols, (ys + 0.5) / rows], -1).flatten(0, 1).to(query.dtype)   # (Q, 2)
        loc = (ref[None, :, None, None, None, :] + offsets).permute(0, 3, 2, 1, 4, 5)  # (B, 2, h, Q, P, 2)
        w = weights.permute(0, 3, 2, 1, 4).reshape(b * 2 * h, 1, q, self.points)
        sampled = (_sample(value, loc.reshape(b * 2 * h, q, self.points, 2)) * w).sum(-1)  # (B·2·h, C/h, Q)
        out = sampled.view(b, 2, c, q).mean(1)                                          # mean over the 2 frames
        return self.dropout(self.output_proj(out.transpose(1, 2)))


class EncoderLayer(nn.Module):
    """TSA → norm → SCA → norm → FFN → norm."""

    def __init__(self, *, embed_dims: int, num_heads: int, num_levels: int, num_heights: int, num_points: int,
                 tsa_points: int, ffn_channels: int, dropout: float) -> None:
        super().__init__()
        self.temporal_attn = TemporalSelfAttention(embed_dims=embed_dims, num_heads=num_heads, num_points=tsa_points,
                                                   dropout=dropout)
        self.spatial_attn = SpatialCrossAttention(embed_dims=embed_dims, num_heads=num_heads, num_levels=num_levels,
                                                  num_heights=num_heights, num_points=num_points, dropout=dropout)
        self.ffn = nn.Sequential(nn.Linear(embed_dims, ffn_channels), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_channels, embed_dims), nn.Dropout(dropout))
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query: torch.Tensor, pos: torch.Tensor, prev: torch.Tensor, shape: tuple[int, int],
                feats: Sequence[torch.Tensor], views: CameraQueries) -> torch.Tensor:
        query = self.norms[0](query + self.temporal_attn(query + pos, prev, shape))
        query = self.norms[1](query + self.spatial_attn(query + pos, feats, views))
        return self.norms[2](query + self.ffn(query))


class BEVFormer(CameraStudent):
    """BEV queries on the student grid, N encoder layers, then the shared CenterHead."""

    ref_points: torch.Tensor
    """(H·W, Z, 3) pillar reference points of the BEV cells (a buffer)."""

    def __init__(self, *, image_encoder: ImageEncoder, head: CenterHead, grid: BEVGrid, embed_dims: int,
                 num_layers: int, num_heads: int, num_points: int, tsa_points: int,
                 pillar_heights: Sequence[float], ffn_channels: int, queue: int, dropout: float) -> None:
        """
        Args:
            image_encoder: images → `levels` feature maps of `embed_dims` channels.
            head: the CenterHead on `grid`, with `embed_dims` input channels.
            grid: the BEV grid of the queries.
            embed_dims, num_layers, num_heads: width, depth and heads of the encoder.
            num_points: SCA samples per pillar height and head; tsa_points: TSA samples per frame and head.
            pillar_heights: z of each query's reference points (LiDAR frame, m).
            ffn_channels: hidden width of the FFN.
            queue: previous keyframes encoded without gradient for the temporal attention.
            dropout: dropout probability.
        """
        super().__init__(image_encoder=image_encoder, head=head, grid=grid)
        rows, cols = grid.shape
        self.queue = queue
        self.pillar_heights = tuple(float(z) for z in pillar_heights)
        self.bev_embedding = nn.Embedding(rows * cols, embed_dims)
        self.row_embed = nn.Embedding(rows, embed_dims // 2)
        self.col_embed = nn.Embedding(cols, embed_dims - embed_dims // 2)
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dims=embed_dims, num_heads=num_heads, num_levels=image_encoder.levels,
                         num_heights=len(self.pillar_heights), num_points=num_points, tsa_points=tsa_points,
                         ffn_channels=ffn_channels, dropout=dropout) for _ in range(num_layers))
        self.register_buffer("ref_points", bev_points(grid, self.pillar_heights, torch.device("cpu")),
                             persistent=False)

    def _positions(self) -> torch.Tensor:
        """(H·W, C) learned positional encoding: column embedding ‖ row embedding."""
        rows, cols = self.grid.shape
        col = self.col_embed.weight[None, :, :].expand(rows, -1, -1)
        row = self.row_embed.weight[:, None, :].expand(-1, cols, -1)
        return torch.cat([col, row], dim=-1).flatten(0, 1)

    def encode_frame(self, images: torch.Tensor, lidar2img: torch.Tensor, prev: torch.Tensor | None,
                     prev_valid: torch.Tensor) -> torch.Tensor:
        """One frame: images (B, 6, 3, H, W), lidar2img (B, 6, 4, 4), prev (B, C, H_bev, W_bev) already in this
        frame (or None), prev_valid (B,) bool. Returns (B, C, H_bev, W_bev)."""
        b = images.shape[0]
        rows, cols = self.grid.shape
        feats = self.image_encoder(images)
        size = (images.shape[-1], images.shape[-2])
        q, z = self.ref_points.shape[:2]
        uv, _, visible = project(self.ref_points.flatten(0, 1), lidar2img, size)
        views = CameraQueries.build(uv.view(b, -1, q, z, 2), visible.view(b, -1, q, z))
        query = self.bev_embedding.weight[None].expand(b, -1, -1)
        pos = self._positions()[None]
        prev_q = None if prev is None else prev.flatten(2).transpose(1, 2)
        for layer in self.layers:
            # Queries without a previous frame attend to themselves (BEVFormer's first frame of a scene).
            own = query if prev_q is None else torch.where(prev_valid[:, None, None], prev_q, query)
            query = layer(query, pos, own, (rows, cols), feats, views)
        return query.transpose(1, 2).reshape(b, -1, rows, cols)

    def encode_bev(self, images: torch.Tensor, lidar2img: torch.Tensor, prev2cur: torch.Tensor,
                   frame_valid: torch.Tensor) -> torch.Tensor:
        frames = min(self.queue, images.shape[1] - 1)
        prev, prev_valid = None, torch.zeros_like(frame_valid[:, 0])
        if frames and bool(frame_valid[:, 1:frames + 1].any()):
            was_training = self.training
            self.train(False)
            with torch.no_grad():
                for f in range(frames, 0, -1):     # oldest first
                    if prev is not None:           # frame f+1 → frame f
                        step = torch.linalg.inv(prev2cur[:, f].double()).float() @ prev2cur[:, f + 1]
                        prev = align_bev(prev, step, self.grid)
                    prev = self.encode_frame(images[:, f], lidar2img[:, f], prev, prev_valid)
                    prev_valid = frame_valid[:, f]
            self.train(was_training)
            assert prev is not None   # frames >= 1 encoded
            prev = align_bev(prev, prev2cur[:, 1], self.grid)
        return self.encode_frame(images[:, 0], lidar2img[:, 0], prev, prev_valid)
