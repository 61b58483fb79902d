"""Data set layouts: MVTec AD and a plain folder layout, as sequences of :class:`Sample`.

MVTec AD::

    root/<category>/train/good/*.png
    root/<category>/test/good/*.png, root/<category>/test/<defect type>/*.png
    root/<category>/ground_truth/<defect type>/<stem>_mask.png

Plain folders: a folder of good images, any number of folders of defective ones (the folder name is the
defect type), and optionally a mask folder holding ``<defect type>/<stem>_mask.png``, ``<stem>_mask.png``
or ``<stem>.png`` for each defective image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..features.preprocess import ImageReadError, Preprocess
from .images import list_image_files

PathLike = Union[str, os.PathLike]
SPLITS = ("train", "test")


def load_mask(path: PathLike) -> np.ndarray:
    """A mask file as an (H, W) bool array (nonzero = defect); ImageReadError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img if img.mode in ("L", "1", "I", "I;16") else img.convert("L"))
    except OSError as exc:
        raise ImageReadError(f"cannot read mask {os.fspath(path)!r}: {type(exc).__name__}: {exc}") from exc
    return arr > 0


@dataclass(frozen=True)
class Sample:
    """One image of a data set: path, label (0 good, 1 defective), mask path (None if none) and defect type."""

    image_path: str
    label: int
    mask_path: Optional[str] = None
    defect_type: str = "good"

    def load_mask(self, preprocess: Optional[Preprocess] = None) -> np.ndarray:
        """The ground-truth mask as bool, all False for good images or when there is no mask file.

        Without ``preprocess``: at the image's own size; with it: resized and cropped like the image,
        i.e. aligned with the anomaly maps (crop x crop).
        """
        if self.mask_path is not None:
            mask = load_mask(self.mask_path)
        else:
            try:
                with Image.open(self.image_path) as img:
                    w, h = img.size
            except OSError as exc:
                raise ImageReadError(f"cannot read image {self.image_path!r}: {exc}") from exc
            mask = np.zeros((h, w), dtype=bool)
        return preprocess.mask(mask) if preprocess is not None else mask


class _SampleList(Sequence[Sample]):
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def image_paths(self) -> list[str]:
        return [s.image_path for s in self.samples]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int array, 1 = defective."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def defect_types(self) -> list[str]:
        return [s.defect_type for s in self.samples]

    def masks(self, preprocess: Optional[Preprocess] = None) -> np.ndarray:
        """(N, crop, crop) bool masks aligned with the anomaly maps (``preprocess`` required for a common size)."""
        return np.stack([s.load_mask(preprocess) for s in self.samples])


class MVTecAD(_SampleList):
    """One category and split of an MVTec AD style folder (``split`` "train" or "test")."""

    def __init__(self, root: PathLike, category: str, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.category, self.split = Path(root), category, split
        base = self.root / category
        if not self.root.is_dir():
            raise FileNotFoundError(f"MVTec AD root {str(self.root)!r} does not exist")
        if not base.is_dir():
            found = ", ".join(self.categories(self.root)) or "none"
            raise FileNotFoundError(
                f"category {category!r} not found under {str(self.root)!r} (categories found: {found})"
            )
        split_dir = base / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"{str(split_dir)!r} does not exist (expected the MVTec AD layout root/<category>/{split}/...)"
            )
        samples: list[Sample] = []
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for f in list_image_files(defect_dir):
                mask = None
                if defect != "good":
                    candidate = base / "ground_truth" / defect / f"{Path(f).stem}_mask.png"
                    mask = str(candidate) if candidate.is_file() else None
                samples.append(Sample(f, 0 if defect == "good" else 1, mask, defect))
        if not samples:
            raise ValueError(f"no images found under {str(split_dir)!r}")
        if split == "train" and any(s.label for s in samples):
            raise ValueError(f"{str(split_dir)!r} holds folders other than 'good': training images must be defect-free")
        self.samples = samples

    @staticmethod
    def categories(root: PathLike) -> list[str]:
        """Category folders under ``root`` (those with a train/ or test/ subfolder), sorted."""
        r = Path(root)
        if not r.is_dir():
            raise FileNotFoundError(f"MVTec AD root {str(r)!r} does not exist")
        return sorted(p.name for p in r.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))

    def __repr__(self) -> str:
        return f"MVTecAD({str(self.root)!r}, {self.category!r}, {self.split!r}; {len(self)} images)"


class FolderDataset(_SampleList):
    """Good images from ``good_dir`` (label 0) and defective ones from each of ``defect_dirs`` (label 1).

    ``defect_dirs``: a sequence of folders (the defect type is the folder name) or a mapping type -> folder.
    ``mask_dir``: optional folder of masks for the defective images (see the module docstring).
    """

    def __init__(
        self,
        good_dir: Optional[PathLike],
        defect_dirs: Union[Sequence[PathLike], Mapping[str, PathLike]] = (),
        mask_dir: Optional[PathLike] = None,
    ) -> None:
        pairs = (
            list(defect_dirs.items()) if isinstance(defect_dirs, Mapping) else [(Path(d).name, d) for d in defect_dirs]
        )
        if mask_dir is not None and not Path(mask_dir).is_dir():
            raise FileNotFoundError(f"mask folder {os.fspath(mask_dir)!r} does not exist")
        samples: list[Sample] = []
        if good_dir is not None:
            samples += [Sample(f, 0, None, "good") for f in list_image_files(good_dir)]
        for defect, folder in pairs:
            for f in list_image_files(folder):
                samples.append(Sample(f, 1, self._find_mask(mask_dir, defect, Path(f).stem), str(defect)))
        if not samples:
            raise ValueError("the folder data set is empty: no image files in the given folders")
        self.samples = samples

    @staticmethod
    def _find_mask(mask_dir: Optional[PathLike], defect: str, stem: str) -> Optional[str]:
        if mask_dir is None:
            return None
        root = Path(mask_dir)
        for candidate in (
            root / defect / f"{stem}_mask.png",
            root / defect / f"{stem}.png",
            root / f"{stem}_mask.png",
            root / f"{stem}.png",
        ):
            if candidate.is_file():
                return str(candidate)
        return None

    def __repr__(self) -> str:
        return f"FolderDataset({len(self)} images, {int(self.labels.sum())} defective)"
