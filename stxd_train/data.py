"""Camera samples for the students, optionally joined with the teacher cache.

An item is one keyframe: its six images, their `lidar2img`, the GT boxes, and, for temporal students,
the images of the previous `queue` keyframes with the ego-motion transform of each into the current
keyframe's LiDAR frame. With a cache, the item also carries the sample's `CacheRecord`; the join is
checked once, when the dataset is built, so a missing token fails before the first step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset

from pipelines.cameras import load_cameras
from pipelines.errors import ConfigError, SensorFileError
from pipelines.geometry import invert
from pipelines.grid import BEVGrid
from pipelines.nuscenes import SampleIndex, SampleInfo
from stxd_train.configs import CameraAugmentConfig
from stxd_train.distill.response import DEFAULT_MATCH, GTMatch, best_gt_iou

if TYPE_CHECKING:
    from stxd_cache.schema import CacheRecord
    from stxd_cache.store import CacheReader


@dataclass(frozen=True)
class LidarFrames:
    """What a dataset loads for an online teacher: the keyframe and `k` previous keyframes."""

    k: int
    num_sweeps: int
    point_range: tuple[float, ...]


def load_frames(sample_frames: Sequence[SampleInfo | None], frames: LidarFrames) -> list[np.ndarray | None]:
    """Points of the keyframe and its previous keyframes (None where missing), each in its own LiDAR frame."""
    from pipelines.lidar import load_sweeps

    return [None if s is None else load_sweeps(s, num_sweeps=frames.num_sweeps, point_range=frames.point_range)
            for s in sample_frames]


@dataclass(frozen=True)
class TeacherBatch:
    """The teacher's records of a batch of B samples, read from the cache (`collate`) or computed by a live teacher
    (`stxd_train.online.OnlineTeacher.records`); what the distillation losses consume. M: boxes per sample (the
    cache's box capacity), K: past frames, P: token grid, C: teacher channels."""

    bev: torch.Tensor
    """(B, C, H, W) teacher BEV on the distillation grid."""
    tokens: torch.Tensor
    """(B, P·P, C) the BEV's P×P block means (`stxd_cache.schema.pool_tokens`)."""
    past_tokens: torch.Tensor
    """(B, K, P·P, C) tokens of the previous keyframes, nearest first; zeros where `past_valid` is False."""
    past_valid: torch.Tensor
    """(B, K) bool: the past frame exists."""
    boxes: torch.Tensor
    """(B, M, 9) teacher boxes [x, y, z, w, l, h, yaw, vx, vy] by descending score, zero padded."""
    scores: torch.Tensor
    """(B, M) their scores."""
    labels: torch.Tensor
    """(B, M) int64 class indices."""
    probs: torch.Tensor
    """(B, M, classes) their class probabilities."""
    count: torch.Tensor
    """(B,) int64 real boxes per sample (the rest is padding)."""
    iou: torch.Tensor | None = None
    """(B, M) each box's BEV IoU with its matched GT box, computed in the loader for RD's quality; None when RD is
    off or the records come from a live teacher (the quality is computed in the step then)."""

    @property
    def valid(self) -> torch.Tensor:
        """(B, M) bool: the box is real, not padding."""
        return torch.arange(self.boxes.shape[1], device=self.count.device)[None, :] < self.count[:, None]


@dataclass(frozen=True)
class CameraSample:
    """One keyframe for a camera student. F = 1 + queue frames: index 0 is the keyframe itself, then the
    previous keyframes, nearest first."""

    token: str
    images: torch.Tensor
    """(F, 6, 3, H, W) float32, ImageNet-normalised; zeros for frames that do not exist."""
    lidar2img: torch.Tensor
    """(F, 6, 4, 4) float32: frame f's LiDAR frame → pixels of frame f's (augmented) images."""
    prev2cur: torch.Tensor
    """(F, 4, 4) float32: frame f's LiDAR frame → the keyframe's LiDAR frame (identity for f = 0)."""
    frame_valid: torch.Tensor
    """(F,) bool: frame f exists (a scene's first keyframes have fewer predecessors)."""
    gt_boxes: torch.Tensor
    """(N, 9) [x, y, z, w, l, h, yaw, vx, vy] in the keyframe LiDAR frame, centres inside the grid."""
    gt_labels: torch.Tensor
    """(N,) int64 indices into `DETECTION_CLASSES`."""
    cache: CacheRecord | None = None
    """The teacher's cached record of this sample, when the dataset has a cache."""
    cache_iou: torch.Tensor | None = None
    """(M,) each cached teacher box's BEV IoU with its matched GT box in `gt_boxes` (RD's quality, `best_gt_iou`),
    computed here, in the loader worker, rather than in the training step; None without a cache or when RD is off."""
    points: tuple[torch.Tensor | None, ...] | None = None
    """LiDAR points (N, 5) of the keyframe and its previous keyframes (None where missing), each in its own
    LiDAR frame, for an online teacher; None otherwise."""


@dataclass(frozen=True)
class CameraBatch:
    """A collated batch (B items); GT stays a list because the box counts differ."""

    tokens: list[str]
    images: torch.Tensor        # (B, F, 6, 3, H, W)
    lidar2img: torch.Tensor     # (B, F, 6, 4, 4)
    prev2cur: torch.Tensor      # (B, F, 4, 4)
    frame_valid: torch.Tensor   # (B, F) bool
    gt_boxes: list[torch.Tensor]
    gt_labels: list[torch.Tensor]
    cache: TeacherBatch | None = None
    """The samples' cache records, stacked; None without a cache."""
    points: list[tuple[torch.Tensor | None, ...]] | None = None
    """Per sample, the online teacher's LiDAR frames (see `CameraSample.points`); None without one."""


class CameraDataset(Dataset[CameraSample]):
    """Keyframes of a `SampleIndex` as student inputs.

    Picklable and stateless across processes (the cache is opened lazily in each process), so DataLoader
    workers may fork or spawn.
    """

    def __init__(self, index: SampleIndex, *, image_size: tuple[int, int], grid: BEVGrid, queue: int = 0,
                 augment: CameraAugmentConfig | None = None, seed: int = 0, min_points: int = 1,
                 cache: CacheReader | None = None, cache_k: int | None = None, gt_iou: bool = True,
                 gt_match: GTMatch = DEFAULT_MATCH, lidar: LidarFrames | None = None) -> None:
        """
        Args:
            index: the samples; built with `k_prev >= queue`.
            image_size: (width, height) the network sees.
            grid: the student's BEV grid; GT boxes whose centre is outside it are dropped.
            queue: previous keyframes whose images are loaded (temporal students).
            augment: training augmentation, or None.
            seed: augmentation seed.
            min_points: GT boxes with fewer LiDAR points are not targets.
            cache: the teacher cache, opened and checked for training (`stxd_train.fit.open_training_cache`); it
                must hold every sample of `index` and link them to the dataset's previous keyframes.
            cache_k: past frames read from the cache per sample (the distillation's `k`; default: all it links).
            gt_iou: with a cache, compute each teacher box's best GT IoU (`cache_iou`, for RD) in the loader.
            gt_match: how `cache_iou` matches teacher and GT boxes (the distill config's `gt_match`).
            lidar: LiDAR frames to load for an online teacher (the index needs `k_prev >= lidar.k`).
        """
        if queue < 0:
            raise ConfigError(f"queue: found {queue}, expected >= 0 previous keyframes")
        self.index = index
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.grid = grid
        self.queue = queue
        self.augment = augment
        self.seed = seed
        self.min_points = min_points
        self.cache_path = None if cache is None else cache.path
        self.cache_k = cache_k
        self.gt_iou = gt_iou
        self.gt_match = gt_match
        self.lidar = lidar
        self.epoch = 0
        self._by_token = {s.token: s for s in index}
        needed = max(queue, lidar.k if lidar is not None else 0)
        short = [s.token for s in index if len(s.prev_tokens) < min(needed, s.frame_index)]
        if short:
            raise ConfigError(f"sample {short[0]} (and {len(short) - 1} more) links fewer previous keyframes than the "
                              f"{needed} this dataset loads; build the SampleIndex with k_prev >= {needed}")
        _require_images(index)
        self._cache = cache
        self._cache_rows: np.ndarray | None = None
        if cache is not None:
            self._cache_rows = np.asarray(join_cache(cache, list(index)))
            cache.require_stored(self._cache_rows.tolist())

    @property
    def cache(self) -> CacheReader:
        """The cache reader of this process (the one given in the main process; reopened, without the checks that
        the main process ran, in each loader worker)."""
        if self.cache_path is None:
            raise ConfigError("this dataset has no cache")
        if self._cache is None:
            from stxd_cache.store import open_cache

            self._cache = open_cache(self.cache_path)
        return self._cache

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None   # zarr handles are reopened in each worker
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int) -> CameraSample:
        """Item `key % len(self)`; `epoch * len(self) + i` (an epoch-tagging sampler) also selects the epoch of
        the augmentation."""
        epoch, i = divmod(int(key), len(self.index))
        epoch = epoch or self.epoch
        sample = self.index[i]
        rng = np.random.default_rng([self.seed, epoch, i]) if self.augment is not None else None
        scale, offset = _draw_view(self.augment, rng)
        frames: list[SampleInfo | None] = [sample]
        for k in range(self.queue):
            token = sample.prev_tokens[k] if k < len(sample.prev_tokens) else None
            frames.append(self._by_token.get(token) if token else None)
            if token and frames[-1] is None:
                raise ConfigError(f"sample {sample.token}: previous keyframe {token} is not in the index; build "
                                  f"the SampleIndex with k_prev >= {self.queue}")
        w, h = self.image_size
        images = np.zeros((len(frames), 6, 3, h, w), np.float32)
        lidar2img = np.tile(np.eye(4, dtype=np.float32), (len(frames), 6, 1, 1))
        prev2cur = np.tile(np.eye(4, dtype=np.float32), (len(frames), 1, 1))
        valid = np.zeros(len(frames), bool)
        cur_inv = invert(sample.lidar2global)
        for f, frame in enumerate(frames):
            if frame is None:
                continue
            valid[f] = True
            cams = load_cameras(frame, self.image_size, scale=scale, offset=offset,
                                adjust=_draw_adjust(self.augment, rng))
            images[f], lidar2img[f] = cams.images, cams.lidar2img
            prev2cur[f] = cur_inv @ frame.lidar2global
        gt = sample.gt
        boxes = gt.training_boxes()[gt.num_lidar_pts >= self.min_points]
        labels = gt.labels[gt.num_lidar_pts >= self.min_points]
        inside = self.grid.contains(boxes[:, :2])
        boxes, labels = boxes[inside].astype(np.float32), labels[inside].astype(np.int64)
        record, iou = None, None
        if self._cache_rows is not None:
            record = self.cache.read(int(self._cache_rows[i]), k=self.cache_k)
            if self.gt_iou:
                iou = np.zeros(len(record.boxes), np.float32)
                iou[:record.count] = best_gt_iou(record.boxes[:record.count], boxes, record.labels[:record.count],
                                                 labels, self.gt_match)
        points = None
        if self.lidar is not None:
            past = [self._by_token.get(t) for t in sample.prev_tokens[:self.lidar.k]]
            past += [None] * (self.lidar.k - len(past))
            points = tuple(None if p is None else torch.from_numpy(p)
                           for p in load_frames([sample, *past], self.lidar))
        return CameraSample(token=sample.token, images=torch.from_numpy(images),
                            lidar2img=torch.from_numpy(lidar2img), prev2cur=torch.from_numpy(prev2cur),
                            frame_valid=torch.from_numpy(valid),
                            gt_boxes=torch.from_numpy(boxes), gt_labels=torch.from_numpy(labels), cache=record,
                            cache_iou=None if iou is None else torch.from_numpy(iou), points=points)


def _require_images(index: SampleIndex) -> None:
    """Every camera image of `index` exists, checked once up front so that training cannot fail hours in."""
    missing = [cam.path for sample in index for cam in sample.cameras if not os.path.isfile(cam.path)]
    if missing:
        raise SensorFileError(
            f"{len(missing)} camera image(s) of {index.version} {', '.join(index.splits)} are missing, first "
            f"{', '.join(missing[:3])}; the dataset root {index.dataroot} is incomplete (check it with "
            "`stxd-data check`) or --dataroot points to the wrong folder")


def join_cache(cache: CacheReader, samples: Sequence[SampleInfo]) -> list[int]:
    """Cache rows of `samples` in a cache opened for training (`stxd_train.fit.open_training_cache`), once it holds
    every sample and links each to the dataset's previous keyframes (checked for the samples whose `prev_tokens`
    list at least the cache's `k_max`, or the whole scene). Raises a `ConfigError` listing missing samples, or the
    cache's own errors."""
    tokens = [s.token for s in samples]
    known = set(cache.tokens)
    missing = [t for t in tokens if t not in known]
    if missing:
        raise ConfigError(
            f"cache {cache.path} lacks {len(missing)} of the {len(tokens)} samples to train on (first: "
            f"{', '.join(missing[:3])}); it holds {len(cache)} samples of {cache.meta.dataset.version} "
            f"{', '.join(cache.meta.dataset.splits)}: extract a cache over the training splits of this dataset")
    k = cache.meta.k_max
    cache.require_links({s.token: s.prev_tokens for s in samples if len(s.prev_tokens) >= min(k, s.frame_index)})
    return [cache.index_of(t) for t in tokens]


def _draw_view(cfg: CameraAugmentConfig | None, rng: np.random.Generator | None
               ) -> tuple[float, tuple[float, float]]:
    """The resize factor and window position of one item, shared by its cameras and frames."""
    if cfg is None or rng is None or not cfg.geometric:
        return 1.0, (0.0, 0.0)
    return float(rng.uniform(*cfg.scale)), (float(rng.random()), float(rng.random()))


def _draw_adjust(cfg: CameraAugmentConfig | None, rng: np.random.Generator | None
                 ) -> Callable[[Image.Image], Image.Image] | None:
    """The photometric change of one frame (brightness, contrast, saturation factors), or None."""
    if cfg is None or rng is None:
        return None
    jitter = [(enhancer, float(rng.uniform(1 - amount, 1 + amount)))
              for enhancer, amount in ((ImageEnhance.Brightness, cfg.brightness),
                                       (ImageEnhance.Contrast, cfg.contrast),
                                       (ImageEnhance.Color, cfg.saturation)) if amount > 0]
    if not jitter:
        return None

    def adjust(img: Image.Image) -> Image.Image:
        for enhancer, factor in jitter:
            img = enhancer(img).enhance(factor)
        return img

    return adjust


def collate(samples: Sequence[CameraSample]) -> CameraBatch:
    """Stack a list of samples into a `CameraBatch`."""
    cache = None
    records = [s.cache for s in samples if s.cache is not None]
    if records:

        def stack(name: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([getattr(r, name) for r in records]))

        cache = TeacherBatch(
            bev=stack("bev"), tokens=stack("tokens"), past_tokens=stack("past_tokens"), past_valid=stack("past_valid"),
            boxes=stack("boxes"), scores=stack("scores"), labels=stack("labels"), probs=stack("probs"),
            count=torch.tensor([r.count for r in records], dtype=torch.int64),
            iou=None if samples[0].cache_iou is None else torch.stack([s.cache_iou for s in samples
                                                                        if s.cache_iou is not None]))
    return CameraBatch(
        tokens=[s.token for s in samples], images=torch.stack([s.images for s in samples]),
        lidar2img=torch.stack([s.lidar2img for s in samples]), prev2cur=torch.stack([s.prev2cur for s in samples]),
        frame_valid=torch.stack([s.frame_valid for s in samples]), gt_boxes=[s.gt_boxes for s in samples],
        gt_labels=[s.gt_labels for s in samples], cache=cache,
        points=None if samples[0].points is None else [s.points for s in samples if s.points is not None])
