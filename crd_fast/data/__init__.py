"""Image inputs and data set layouts."""

from .datasets import FolderDataset, MVTecAD, Sample, load_mask
from .images import count_images, iter_images, list_image_files

__all__ = ["FolderDataset", "MVTecAD", "Sample", "load_mask", "count_images", "iter_images", "list_image_files"]
