from runner.data.base import ArrayDataModule, TensorBatches
from runner.data.mnist1d import MNIST1D
from runner.data.sklearn import SklearnDataset

__all__ = ["ArrayDataModule", "TensorBatches", "MNIST1D", "SklearnDataset"]
