"""The medical image data layer: every stage (SSA, fine-tuning, evaluation) reads images through it.

Typical use::

    from essa import data

    source = data.open_source("../shared/data/brain_tumor_mri")        # folder, .csv, .npz, .dcm, .nii.gz
    kept = data.find_duplicates(source, policy="drop").records          # one copy per exact-duplicate group
    splits = data.split(kept, val=0.1, seed=0)                          # official Training/Testing kept
    train = data.ImageDataset(source, splits["train"], data.transforms.train_transform(224))
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, num_workers=2)
    print(train.report)                                                 # files skipped as unreadable

API:

- ``Record(path, label=None, group=None, split=None, index=None)``: one 2-D image. ``path`` is a file or a key
  (``file.npz#train/12``, ``scan.dcm#frame=3``, ``volume.nii.gz#axis2=40``); ``label`` a class index, a tuple
  of class indices (multi-label) or None; ``group`` a patient id; ``split`` ``train``/``val``/``test``/None;
  ``index`` the frame, slice or row in ``record.file``.
- ``open_source(path_or_config, **options) -> Source``: dispatched by what the path is (``dispatch``). A
  ``Source`` has ``records`` (list[Record]), ``classes`` (list[str], stable order), ``task`` (``binary``,
  ``multiclass``, ``multilabel``, ``ordinal`` or None), ``ignored`` (non-image files), ``load(record)`` -> 8-bit
  RGB ``PIL.Image`` and ``read(record)`` -> the image in its own mode.
  Options: folder ``labels`` (None auto, False for SSA: any nesting, no labels); CSV ``root``, ``labels``,
  ``path_column``, ``label_column``, ``label_columns``, ``group_column``, ``split_column``, ``classes``; DICOM
  and NIfTI ``window=(centre, width)``, ``percentiles=(low, high)``, ``axis``; MedMNIST name ``size``, ``root``.
- ``CombinedSource([(source, records), ...])``: several sources as one unlabelled source (each record decoded
  by its own; a path named twice kept once).
- ``split(records, val=0.1, test=0.1, seed=0, *, stratify=True, official=True) -> {"train", "val", "test"}``:
  seeded, stratified, grouped by ``record.group``; official splits kept, missing ones carved from train.
  ``subsample(records, n, seed=0, *, stratify=True)``: a seeded, stratified, grouped subset of about ``n``.
- ``find_duplicates(source, records=None, *, near=False, threshold=2, policy="report", scope="all", workers=0)
  -> DuplicateReport`` (``groups`` with ``splits``, ``records`` after the policy, ``dropped``, ``unreadable``,
  ``summary()``); policy ``report`` / ``drop`` (keep the test copy, else val, else train) / ``error``.
- ``ImageDataset(source, records=None, transform=None, cache=None)``: ``(tensor (3, S, S), label)``; label an
  int, a float multi-hot tensor (multi-label) or -1 (unlabelled); unreadable files skipped and listed in
  ``report``. ``DiskCache(folder, size)``: decoded, downsized images on disk. ``dataset.dataset_stats(source,
  records)`` -> (mean, std) of the pixels, to normalise with instead of ImageNet's.
- ``transforms``: ``eval_transform(img_size, mean, std, interpolation, preprocessing=)``,
  ``train_transform(img_size, mean, std, scale, hflip, interpolation, preprocessing=)``, ``IMAGENET_MEAN``,
  ``IMAGENET_STD`` (the defaults).
- ``normalize``: a backbone's preprocessing (``Preprocessing``: mean, std, interpolation; ``of_model(model)``,
  ``resolve(mode, own, source, records, img_size=...)`` for ``data.normalize: model|imagenet|dataset``, the
  safetensors header fields ``header`` / ``from_header``).
- ``dataset_card(path_or_config, *, scan=True, near=False, ...) -> dict`` and ``format_card(card)``: what
  ``essa data inspect PATH [--json]`` prints.
- ``DataError`` (a ``ValueError``): bad input, with a message naming the file and what was expected.

How pixels are normalised: ``images`` (modes, 16-bit, windowing), ``dicom``, ``nifti``, ``transforms``, ``normalize``.
"""

from essa.data import normalize, transforms
from essa.data.cache import DiskCache
from essa.data.dataset import ImageDataset
from essa.data.dispatch import open_source
from essa.data.duplicates import DuplicateGroup, DuplicateReport, find_duplicates
from essa.data.files import Decode
from essa.data.card import dataset_card, format_card
from essa.data.records import DataError, Record
from essa.data.source import CombinedSource, Source
from essa.data.splits import split, subsample

__all__ = [
    "CombinedSource", "DataError", "Decode", "DiskCache", "DuplicateGroup", "DuplicateReport", "ImageDataset", "Record", "Source",
    "dataset_card", "find_duplicates", "format_card", "open_source", "split", "subsample",
    "normalize", "transforms",
]
