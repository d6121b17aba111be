"""The shared data pipeline: :class:`DistillDataModule` and the data sets it knows by name.

Modules: ``module`` (the DataModule), ``catalog`` (names), ``memory`` (mnist5k, fake),
``tvsets`` (torchvision data sets), ``folders`` (imagefolder, imagenet), ``splits`` (stratified
splitting, indexed samples), ``transforms`` (augmentation presets).
"""

from distill.data.catalog import SOURCES
from distill.data.module import DistillDataModule
from distill.data.transforms import PRESETS

DATASETS = tuple(SOURCES)

__all__ = ["DATASETS", "PRESETS", "DistillDataModule"]
