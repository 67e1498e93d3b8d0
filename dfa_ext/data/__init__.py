"""Datasets and loaders: ``load_data(name, data_dir)`` -> ``DataBundle(train, test, spec)``; a user's
own torch datasets -> ``as_bundle(dataset or (train, test))``.

Items are ``(normalised [C, H, W] image, int label)``, the image in torch's default dtype when the data
was loaded (float32 unless set otherwise). Training augmentation is drawn per sample from
(seed, epoch, index), so it does not depend on workers, ranks or resumes.
"""

from __future__ import annotations

from .loader import EpochSampler, make_loader
from .registry import DEFAULT_DATASET, available_datasets, dataset_options, load_data
from .spec import DataBundle, DataSpec
from .transforms import Augment
from .user_data import LabelledDataset, as_bundle, check_bundle, describe, infer_spec

__all__ = ["DataBundle", "DataSpec", "Augment", "load_data", "available_datasets", "dataset_options",
           "DEFAULT_DATASET", "EpochSampler", "make_loader", "LabelledDataset", "as_bundle", "check_bundle",
           "describe", "infer_spec"]
