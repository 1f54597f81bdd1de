"""Points to a batched sparse voxel tensor with a mean voxel feature encoder (mmdet3d `HardSimpleVFE`)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

with warnings.catch_warnings():
    # spconv 2.3.6 decorates its autograd functions with `torch.cuda.amp.custom_fwd` (deprecated since
    # torch 2.4) and its build helper calls `locale.getdefaultlocale`: warnings about spconv's code, not ours.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    import spconv.pytorch as spconv
    from spconv.pytorch.utils import PointToVoxel

# spconv's SparseConvTensor asks `torch.fx.is_fx_tracing()` at every construction, which makes torch log, once per
# process, advice meant for spconv's authors; a dask extraction printed it once per worker.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


class Voxelizer:
    """Hard voxelisation with spconv's `PointToVoxel` and the mean of the points in each voxel as feature.

    Not an `nn.Module`: it has no parameters. `PointToVoxel` owns reusable buffers (on CPU, a dense hash
    table of the whole grid: 340 MB for the nuScenes 1440x1440x40 grid), so one is created lazily per
    device on first use; a `Voxelizer` must therefore not be shared between threads.
    """

    def __init__(
        self,
        *,
        point_range: Sequence[float],
        voxel_size: Sequence[float],
        max_points_per_voxel: int,
        max_voxels: int,
        num_point_features: int,
        sparse_shape: Sequence[int],
    ) -> None:
        """
        Args:
            point_range: [x_min, y_min, z_min, x_max, y_max, z_max] in metres; points outside are dropped.
            voxel_size: (x, y, z) in metres.
            max_points_per_voxel: points kept per voxel (the first ones in point order).
            max_voxels: voxels kept per sample (the first ones in point order).
            num_point_features: point columns used as features, e.g. 5 for x, y, z, intensity, time_lag.
            sparse_shape: (Z, Y, X) of the sparse tensor; at least the voxel grid (mmdet3d adds 1 in z).
        """
        self.point_range = tuple(float(v) for v in point_range)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.max_points_per_voxel = int(max_points_per_voxel)
        self.max_voxels = int(max_voxels)
        self.num_point_features = int(num_point_features)
        self.sparse_shape = tuple(int(v) for v in sparse_shape)
        self._generators: dict[torch.device, PointToVoxel] = {}

    def _generator(self, device: torch.device) -> PointToVoxel:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = PointToVoxel(
                vsize_xyz=list(self.voxel_size),
                coors_range_xyz=list(self.point_range),
                num_point_features=self.num_point_features,
                max_num_voxels=self.max_voxels,
                max_num_points_per_voxel=self.max_points_per_voxel,
                device=device,
            )
        return self._generators[device]

    def voxelize(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Voxels of one sample.

        points: (N, >=F) [x, y, z, intensity, time_lag, ...] in the keyframe LiDAR frame; F =
        `num_point_features` columns are used.
        Returns voxels (M, P, F) float32 zero-padded, coords (M, 3) int32 (z, y, x), num_points (M,) int32.
        """
        if points.ndim != 2 or points.shape[1] < self.num_point_features:
            raise ValueError(
                f"points of shape {tuple(points.shape)}; expected (N, >={self.num_point_features}) "
                "[x, y, z, intensity, time_lag]")
        pc = points[:, : self.num_point_features].detach().float().contiguous()
        voxels, coords, num_points = self._generator(pc.device)(pc)
        return voxels, coords, num_points

    @staticmethod
    def mean_features(voxels: torch.Tensor, num_points: torch.Tensor) -> torch.Tensor:
        """Mean of the points of each voxel.

        voxels: (M, P, F) zero-padded; num_points: (M,). Returns (M, F).
        """
        count = num_points.clamp(min=1).to(voxels.dtype)[:, None]
        return voxels.sum(dim=1) / count

    def __call__(self, points: Sequence[torch.Tensor]) -> spconv.SparseConvTensor:
        """The batch as one sparse tensor.

        points: B tensors (N_i, >=F) in the keyframe LiDAR frame, all on one device.
        Returns a `SparseConvTensor` with features (M, F) (voxel means), indices (M, 4) int32
        [batch, z, y, x], spatial shape `sparse_shape` and batch size B.
        """
        if len(points) == 0:
            raise ValueError("no samples to voxelise; expected a list of at least one (N, 5) point tensor")
        features, indices = [], []
        for b, pts in enumerate(points):
            voxels, coords, num_points = self.voxelize(pts)
            features.append(self.mean_features(voxels, num_points))
            batch = torch.full((len(coords), 1), b, dtype=coords.dtype, device=coords.device)
            indices.append(torch.cat([batch, coords], dim=1))
        return spconv.SparseConvTensor(
            features=torch.cat(features), indices=torch.cat(indices), spatial_shape=list(self.sparse_shape),
            batch_size=len(points))
