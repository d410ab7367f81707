"""Hugging Face classifiers (image or text), built from a config dict or loaded pretrained.

transformers is imported inside `HuggingFace.__init__`: on their own its Auto classes take about a
second to import, which runs that use no Hugging Face model should not pay.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from runner.errors import ConfigError, check
from runner.models.zoo import last_linear_name

TASKS = ("image", "text")
# the usual names of the final classifier layer in transformers' classification models
HEAD_ATTRS = ("classifier", "score", "head", "fc")


def plain(value: Any) -> Any:
    """Nested mappings / sequences (e.g. OmegaConf containers from Hydra) as dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


class HuggingFace(nn.Module):
    """A transformers sequence- or image-classification model whose forward returns the logits.

    task="image": AutoModelForImageClassification, x a float tensor (B, C, H, W) (flat rows are
    reshaped with the config's num_channels and image_size). task="text":
    AutoModelForSequenceClassification, x a dict of tensors (input_ids, attention_mask, ...); keys
    the model's forward does not name are dropped. With `pretrained` (a hub name or a local path)
    the weights are loaded and the classifier is re-initialised for `num_classes`; otherwise
    `config` = {"model_type": ..., **config kwargs} builds a randomly initialised model offline.
    `head_name` is the qualified name of the final Linear layer: its input is the features.
    """

    head_name: str

    def __init__(
        self, task: str, num_classes: int, config: Mapping[str, Any] | None = None, pretrained: str | None = None
    ) -> None:
        super().__init__()
        check(task in TASKS, "model.task", task, list(TASKS))
        check(isinstance(num_classes, int) and num_classes >= 2, "model.num_classes", num_classes, "an integer >= 2")
        config = plain(config) if config is not None else None
        if pretrained is None:
            check(
                isinstance(config, dict) and isinstance(config.get("model_type"), str),
                "model.config",
                config,
                "a mapping with model_type (e.g. vit, bert) and that config's arguments, or set model.pretrained",
            )
        else:
            check(
                isinstance(pretrained, str) and bool(pretrained),
                "model.pretrained",
                pretrained,
                "a Hugging Face hub name or a local folder",
            )
        self.task, self.num_classes = task, num_classes
        self.model = self._build(task, num_classes, config, pretrained)
        # named parameters only (a trailing **kwargs takes attention flags, not inputs); targets
        # are passed to the loss, never as labels (the model would compute its own loss)
        params = inspect.signature(self.model.forward).parameters.values()
        self.input_names = frozenset(p.name for p in params if p.kind is not p.VAR_KEYWORD) - {"labels"}
        self.head_name = "model." + self._head(num_classes)
        self.input_shape, self.in_features = self._input_size(task, self.model.config)

    @staticmethod
    def _input_size(task: str, cfg: Any) -> tuple[tuple[int, int, int] | None, int | None]:
        """(C, H, W) and C*H*W of an image model; (None, vocab_size) of a text model, the token-id
        range as BagOfEmbeddings reports it; None where the config does not fix them."""
        if task == "text":
            vocab = getattr(cfg, "vocab_size", None)
            return None, int(vocab) if vocab else None
        size, channels = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", None)
        if not size or not channels:  # e.g. convolutional models take any image size
            return None, None
        h, w = size if isinstance(size, Sequence) else (size, size)
        return (int(channels), int(h), int(w)), int(channels) * int(h) * int(w)

    @staticmethod
    def _build(task: str, num_classes: int, config: dict | None, pretrained: str | None) -> nn.Module:
        import transformers

        auto = (
            transformers.AutoModelForImageClassification
            if task == "image"
            else transformers.AutoModelForSequenceClassification
        )
        # building prints "some weights were newly initialized" and similar notices at warning level
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            if pretrained is not None:
                return auto.from_pretrained(pretrained, num_labels=num_classes, ignore_mismatched_sizes=True)
            rest = {k: v for k, v in config.items() if k != "model_type"}
            try:
                hf_config = transformers.AutoConfig.for_model(config["model_type"], num_labels=num_classes, **rest)
            except ValueError as e:  # an unknown model_type
                raise ConfigError(
                    "model.config.model_type", config["model_type"], f"a transformers model type ({e})"
                ) from None
            try:
                return auto.from_config(hf_config)
            except ValueError as e:  # a model type without this task's head (e.g. gpt2 for images)
                raise ConfigError(
                    "model.config.model_type",
                    config["model_type"],
                    f"a model type with a {task} classification head ({e})",
                ) from None
        finally:
            transformers.logging.set_verbosity(verbosity)

    def _head(self, num_classes: int) -> str:
        for attr in HEAD_ATTRS:
            layer = getattr(self.model, attr, None)
            if isinstance(layer, nn.Linear) and layer.out_features == num_classes:
                return attr
        name = last_linear_name(self.model, out_features=num_classes)
        check(
            name is not None,
            "model",
            type(self.model).__name__,
            f"a model whose last layer is a Linear with {num_classes} outputs",
        )
        return name

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.task == "image":
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"an image model takes a float tensor (B, C, H, W), got {type(x).__name__}")
            if x.dim() == 2 and self.input_shape is not None:
                x = x.reshape(x.shape[0], *self.input_shape)
            return self.model(pixel_values=x).logits
        if not isinstance(x, Mapping):
            raise TypeError(f"a text model takes a dict of tensors (input_ids, attention_mask), got {type(x).__name__}")
        return self.model(**{k: v for k, v in x.items() if k in self.input_names}).logits
