"""Stage one of stxd: the LiDAR teacher and the offline Zarr cache of its features and boxes."""
