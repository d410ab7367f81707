from runner.models.lit import LitClassifier
from runner.models.nets import CNN1D, GRU, MLP, LogReg, Net

__all__ = ["CNN1D", "GRU", "MLP", "LogReg", "Net", "LitClassifier"]
