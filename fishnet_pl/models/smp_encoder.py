"""FishNet as a segmentation-models-pytorch encoder.

Importing ``fishnet_pl`` registers every FishNet variant under its name, so a plain smp user writes

    model = smp.create_model("FPN", encoder_name="fishnet150", encoder_weights=None, classes=19)
    model.encoder.load_weights("fishnet150_ckpt.tar")   # or one of our Lightning .ckpt files

smp downloads named weights from the Hugging Face hub; FishNet's weights are local files, hence
``load_weights`` instead of ``encoder_weights``. smp's encoder contract: ``forward`` returns
``depth + 1`` maps at strides 1, 2, 4, 8, 16, 32 (the input first), ``out_channels`` lists their
channels, ``make_dilated`` turns the last down-samplings into dilation (output stride 8 or 16).
FishNet changes resolution in pooling, up-sampling and concatenation, which smp's generic
``make_dilated`` (strided convolutions only) cannot see, so it calls FishNet's own surgery.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator

import torch
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from segmentation_models_pytorch.encoders._base import EncoderMixin
from torch import nn

from fishnet_pl.models.fishnet import VARIANT_CONFIGS, FishNet


def _check_depth(depth: int) -> None:
    if depth not in (3, 4, 5):
        raise ValueError(f"FishNet encoders give depth 3, 4 or 5 (maps down to stride 8, 16 or 32), got {depth}")


class _FishNetEncoderMixin(EncoderMixin):
    """smp's encoder interface over a FishNet's ``forward_features``."""

    def _init_encoder(self, fishnet: FishNet, depth: int) -> None:
        _check_depth(depth)
        self._depth, self._in_channels = depth, fishnet.in_channels
        self._out_channels = [fishnet.in_channels] + [f["num_chs"] for f in fishnet.feature_info]

    @property
    def fishnet(self) -> FishNet:
        raise NotImplementedError

    # ``output_stride`` (smp checks that inputs are divisible by it) stays FishNet's own: its tail
    # always runs down to that stride, whatever depth the decoder reads. EncoderMixin's property
    # caps it at 2**depth, hence the overrides in the classes below.

    def make_dilated(self, output_stride: int) -> None:
        if output_stride not in (8, 16):
            raise ValueError(f"output stride should be 16 or 8, got {output_stride}")
        self.fishnet.set_output_stride(output_stride)

    def get_stages(self) -> dict:
        raise NotImplementedError("FishNet dilates through set_output_stride, not smp's stage list")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, *self.fishnet.forward_features(x)[: self._depth]]


class FishNetEncoder(FishNet, _FishNetEncoderMixin):
    """A FishNet variant (by registered name) that is an smp encoder; its weights are FishNet's keys."""

    def __init__(self, name: str, depth: int = 5, output_stride: int = 32, **kwargs):
        _check_depth(depth)
        FishNet.__init__(self, VARIANT_CONFIGS[name], features_only=True, output_stride=output_stride)
        self._init_encoder(self, depth)

    @property
    def fishnet(self) -> FishNet:
        return self

    forward = _FishNetEncoderMixin.forward  # not FishNet's (which would drop the input map)

    # FishNet assigns output_stride; EncoderMixin made it a read-only property.
    output_stride = property(lambda self: self.__dict__["_fishnet_output_stride"],
                             lambda self, value: self.__dict__.__setitem__("_fishnet_output_stride", value))

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        super().set_in_channels(in_channels, pretrained)  # smp patches the stem's first convolution
        self.in_channels = in_channels

    def load_weights(self, path: str | os.PathLike) -> list[str]:
        """Load an official FishNet checkpoint or a fishnet-pl ``.ckpt``; returns the dropped keys
        (the classifier). Every other key must match, or the error lists those that do not."""
        from fishnet_pl.models.weights import load_backbone_weights

        return load_backbone_weights(self, path)


class _BoundEncoder(nn.Module, _FishNetEncoderMixin):
    """An existing FishNet seen as an smp encoder, held by reference (it stays its owner's module)."""

    def __init__(self, fishnet: FishNet, depth: int, output_stride: int):
        nn.Module.__init__(self)
        object.__setattr__(self, "_fishnet", fishnet)  # not a sub-module: no second copy of its weights
        self._init_encoder(fishnet, depth)
        if output_stride != 32:
            self.make_dilated(output_stride)

    @property
    def fishnet(self) -> FishNet:
        return self._fishnet

    @property
    def output_stride(self) -> int:
        return self._fishnet.output_stride

    forward = _FishNetEncoderMixin.forward  # not nn.Module's placeholder

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        if in_channels != self.fishnet.in_channels:
            raise ValueError(f"the backbone was built for {self.fishnet.in_channels} input channels, "
                             f"the decoder asks for {in_channels}")


_bound_ids = itertools.count()


@contextlib.contextmanager
def bound_encoder_name(fishnet: FishNet) -> Iterator[str]:
    """An smp encoder name that, while the context lasts, builds a view of ``fishnet`` (no new weights):
    ``smp.create_model(arch, encoder_name=name, ...)`` then decodes this very backbone."""
    name = f"fishnet_pl-bound-{next(_bound_ids)}"

    class Bound(_BoundEncoder):
        def __init__(self, depth: int = 5, output_stride: int = 32, **kwargs):
            super().__init__(fishnet, depth, output_stride)

    smp_encoders[name] = {"encoder": Bound, "pretrained_settings": {}, "params": {}}
    try:
        yield name
    finally:
        del smp_encoders[name]


def register_smp_encoders() -> None:
    for name in VARIANT_CONFIGS:
        smp_encoders.setdefault(name, {"encoder": FishNetEncoder, "pretrained_settings": {}, "params": {"name": name}})


register_smp_encoders()
