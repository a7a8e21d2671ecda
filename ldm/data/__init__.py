"""Data: image-text folders, webdataset shards, latent caches, the embedded emoji dataset, bad-input handling.

Every reader yields ``{"image": (3, H, W) float in [-1, 1], "caption": str, "key": str}`` (latent caches:
``{"latent": (C, h, w), "caption", "key", "context"?: (L, D)}``). Training uses :func:`make_dataloader`.
"""

from ldm.data.distributed import EqualBatchesIterable, ResumableLoader, dist_info, make_dataloader, resolve_source
from ldm.data.folder import FolderDataset, FolderSource
from ldm.data.latent_cache import LatentSource, read_latent_cache, write_latent_cache
from ldm.data.shards import SampleDecoder, ShardDataset, ShardSource, collate, read_manifest
from ldm.data.tario import ShardWriter, braceexpand, expand_shards
from ldm.data.transforms import ImageTransform, to_pil, to_tensor
from ldm.data.validate import Skip, SkipStats

__all__ = [
    "EqualBatchesIterable", "FolderDataset", "FolderSource", "ImageTransform", "LatentSource", "ResumableLoader",
    "SampleDecoder", "ShardDataset", "ShardSource", "ShardWriter", "Skip", "SkipStats", "braceexpand", "collate",
    "dist_info", "expand_shards", "make_dataloader", "read_latent_cache", "read_manifest", "resolve_source",
    "to_pil", "to_tensor", "write_latent_cache",
]
