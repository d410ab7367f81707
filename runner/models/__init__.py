from runner.models.efficientnet_lite import EfficientNetLite
from runner.models.hf import HuggingFace
from runner.models.lit import LitClassifier
from runner.models.llm import CausalLM, CausalLMClassifier, lm_metrics, load_causal_lm
from runner.models.nets import CNN1D, GRU, MLP, LogReg, Net
from runner.models.pretrained import SentenceEncoder
from runner.models.reference import LeNet5, LeNet300, ResNetCIFAR
from runner.models.text import BagOfEmbeddings
from runner.models.zoo import timm_model, torchvision_model

__all__ = [
    "CNN1D",
    "GRU",
    "MLP",
    "LogReg",
    "Net",
    "LitClassifier",
    "LeNet300",
    "LeNet5",
    "ResNetCIFAR",
    "HuggingFace",
    "SentenceEncoder",
    "CausalLMClassifier",
    "CausalLM",
    "load_causal_lm",
    "lm_metrics",
    "BagOfEmbeddings",
    "timm_model",
    "torchvision_model",
    "EfficientNetLite",
]
