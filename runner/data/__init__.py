"""Data sources: every one a LightningDataModule with train/val/test loaders, `num_classes` and
`input_spec` (see runner/data/base.py for the contract)."""

from runner.batches import Chunk, DataSpec, split_batch
from runner.data.base import ArrayDataModule, ArrayDataset, TensorBatches
from runner.data.elpv import ELPV
from runner.data.mnist1d import MNIST1D
from runner.data.mnist5k import MNIST5k
from runner.data.packaged_text import Debates, RottenTomatoes
from runner.data.sklearn import SklearnDataset
from runner.data.sources import DatasetDataModule, LightningSource, as_source, data_values, describe_data
from runner.data.table import TableData
from runner.data.text import TextData
from runner.data.transforms import RandomShift
from runner.data.vision import ImageFolder, TorchvisionFormat

__all__ = [
    "RandomShift",
    "ArrayDataModule",
    "ArrayDataset",
    "TensorBatches",
    "Chunk",
    "DataSpec",
    "split_batch",
    "MNIST1D",
    "MNIST5k",
    "SklearnDataset",
    "DatasetDataModule",
    "LightningSource",
    "as_source",
    "data_values",
    "describe_data",
    "TableData",
    "TextData",
    "RottenTomatoes",
    "Debates",
    "ImageFolder",
    "TorchvisionFormat",
    "ELPV",
]
