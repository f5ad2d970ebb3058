"""MedMNIST (v2) ``.npz`` files, local or downloaded by name with the optional ``medmnist`` package.

A file holds ``{train,val,test}_images``: (N, H, W) grey or (N, H, W, 3) RGB uint8, and ``{split}_labels``:
(N,) or (N, 1) class indices, or (N, K) 0/1 columns for multi-label (ChestMNIST). Records are keyed
``file.npz#train/12`` and keep the official split.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from essa.data import images
from essa.data.records import SPLITS, DataError, Record
from essa.data.source import Source, task_of

_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen"]
# Task and class names of the 2-D MedMNIST datasets (as in medmnist.INFO), so that local files need no package.
DATASETS = {
    "pathmnist": ("multiclass", ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                 "normal colon mucosa", "cancer-associated stroma",
                                 "colorectal adenocarcinoma epithelium"]),
    "chestmnist": ("multilabel", ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                                  "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                                  "pleural", "hernia"]),
    "dermamnist": ("multiclass", ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                  "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                                  "vascular lesions"]),
    "octmnist": ("multiclass", ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "pneumoniamnist": ("binary", ["normal", "pneumonia"]),
    "retinamnist": ("ordinal", ["0", "1", "2", "3", "4"]),
    "breastmnist": ("binary", ["malignant", "normal, benign"]),
    "bloodmnist": ("multiclass", ["basophil", "eosinophil", "erythroblast",
                                  "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                                  "lymphocyte", "monocyte", "neutrophil", "platelet"]),
    "tissuemnist": ("multiclass", ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                                   "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                                   "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"]),
    "organamnist": ("multiclass", _ORGANS),
    "organcmnist": ("multiclass", _ORGANS),
    "organsmnist": ("multiclass", _ORGANS),
}
NAME = re.compile(r"[a-z]+mnist(3d)?")


def _header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz, read from its header without loading it."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(handle)
        return shape, dtype



def _labels(values: np.ndarray) -> list:
    """Class index per row for (N,) / (N, 1); tuple of positive columns per row for (N, K > 1)."""
    if values.ndim == 1 or values.shape[1] == 1:
        return [int(v) for v in values.reshape(-1)]
    return [tuple(int(i) for i in np.flatnonzero(row)) for row in values]


class MedMNISTSource(Source):
    """A MedMNIST ``.npz``; class names and task from ``DATASETS`` when the file name is a known dataset."""

    kind = "medmnist"

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files if k.endswith("_labels")}  # labels are small
                keys = set(npz.files)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            if "pickle" in str(err):  # numpy's words point at unsafe loading: never suggest it
                reason = "not a zip archive of numeric .npy arrays" if not zipfile.is_zipfile(path) else \
                    "it holds object (pickled) arrays; a MedMNIST file holds numeric arrays only"
            else:
                reason = str(err)
            raise DataError(f"{path} is not a readable .npz file ({reason})") from None
        splits = [s for s in SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
        if not splits:
            raise DataError(
                f"{path} is not a MedMNIST file: expected arrays train_images and train_labels (and val_, test_), "
                f"found {', '.join(sorted(keys)) or 'none'}"
            )
        records, labels, multilabel = [], [], False
        for split in splits:
            shape, dtype = _header(path, f"{split}_images")
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
                raise DataError(
                    f"{path}: {split}_images has shape {shape}; expected (N, H, W) or (N, H, W, 3) "
                    "(3-D MedMNIST volumes are not supported)"
                )
            if dtype != np.uint8:
                raise DataError(
                    f"{path}: {split}_images are {dtype}; MedMNIST images are uint8 (0..255): convert them, e.g. "
                    "np.round(np.clip(x, 0, 1) * 255).astype(np.uint8) for values in [0, 1]"
                )
            values = arrays[f"{split}_labels"]
            if values.ndim not in (1, 2) or len(values) != shape[0]:
                raise DataError(
                    f"{path}: {split}_labels has shape {values.shape}; expected ({shape[0]},), ({shape[0]}, 1) "
                    f"or ({shape[0]}, K) to match {split}_images {shape}"
                )
            multilabel |= values.ndim == 2 and values.shape[1] > 1
            labels.append(values)
            found = _labels(values)
            records += [Record(f"{path}#{split}/{i}", label, None, split, i) for i, label in enumerate(found)]
        dataset = DATASETS.get(path.stem.split("_")[0])  # "breastmnist_224.npz": the 224 px version
        count = labels[0].shape[1] if multilabel else 1 + max(int(v.max()) for v in labels)
        numbered = [str(i) for i in range(count)]
        task, classes = dataset or (task_of(numbered, multilabel), numbered)
        if count > len(classes):
            raise DataError(f"{path}: labels go up to class {count - 1}, but {path.stem} has {len(classes)} classes")
        super().__init__(path, records, classes, task)
        self._arrays: dict[str, np.ndarray] = {}

    def read(self, record: Record) -> Image.Image:
        # The array is named in the key, not by record.split, which a re-split may have changed.
        array = record.path.rpartition("#")[2].split("/")[0]
        if array not in self._arrays:  # each process loads an array once, on first use
            with np.load(self.path) as npz:
                self._arrays[array] = npz[f"{array}_images"]
        return images.from_array(self._arrays[array][record.index])

    def __getstate__(self):
        # Worker processes load the arrays themselves rather than receive copies.
        return {**self.__dict__, "_arrays": {}}


def download(name: str, size: int = 28, root: str | Path | None = None) -> Path:
    """Download a MedMNIST dataset with the ``medmnist`` package (imported here only); returns the .npz path."""
    hint = f"offline, give the path of a local .npz file instead (e.g. ../shared/data/medmnist/{name}.npz)"
    try:
        import medmnist
    except ImportError:
        raise DataError(
            f"reading MedMNIST {name!r} by name needs the medmnist package: pip install \"essa[medmnist]\"; {hint}"
        ) from None
    info = medmnist.INFO.get(name)
    if info is None:
        raise DataError(f"{name!r} is not a MedMNIST dataset; valid names: {', '.join(sorted(medmnist.INFO))}")
    root = Path(root) if root is not None else Path.home() / ".medmnist"
    root.mkdir(parents=True, exist_ok=True)
    size_args = {} if size == 28 else {"size": size}  # medmnist < 3 has no size argument
    try:
        getattr(medmnist, info["python_class"])(split="train", download=True, root=str(root), **size_args)
    except Exception as err:  # network and checksum failures come in many types
        raise DataError(f"could not download MedMNIST {name!r} ({err}); {hint}") from err
    return root / f"{name}{'' if size == 28 else f'_{size}'}.npz"
