"""FishNet (Sun et al., NeurIPS 2018), built exactly as the authors' code builds it.

The network is a fish: a *tail* that down-samples (like a ResNet), a *bridge* with an SE-like
attention, a *body* that up-samples (UR-blocks) and a *head* that down-samples again
(DR-blocks). Every body and head stage concatenates its trunk with a "transferred" feature map
from an earlier stage of the same resolution, so the last maps carry every resolution and the
gradient reaches every stage directly (no isolated convolutions).

Feature maps of FishNet-150 at 224x224 (``f`` indices used below, as in the authors' ``all_feat``):

    f0 stem  64@56 | tail f1 128@28, f2 256@14, f3 512@7 | bridge f4 512@7
    body f5 768@14 (512 + f2), f6 512@28 (384 + f1), f7 320@56 (256 + f0)
    head f8 832@28 (320 + f6), f9 1600@14 (832 + f5), f10 2112@7 (1600 + f4) -> score
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm  # BatchNorm2d and SyncBatchNorm
from torch.utils.checkpoint import checkpoint

from fishnet_pl.models.registry import register_backbone

# Which earlier feature map (index into f0..f10) each body / head stage concatenates:
# the authors' ``trans_map = (2, 1, 0, 6, 5, 4)``.
BODY_TRANSFER_FROM = (2, 1, 0)
HEAD_TRANSFER_FROM = (6, 5, 4)
STAGE_NAMES = ("stem", "tail.0", "tail.1", "tail.2", "bridge",
               "body.0", "body.1", "body.2", "head.0", "head.1", "head.2")


@dataclass(frozen=True)
class FishNetConfig:
    """Channels and depths of one FishNet variant; every variant is one of these.

    ``*_planes`` are output channels of each stage's trunk (the authors' ``network_planes``);
    ``*_blocks`` are bottlenecks per stage (``num_res_blks``); ``*_transfer_blocks`` are the
    bottlenecks applied to the concatenated earlier map (``num_trans_blks``). The bridge works at
    the width of the last tail stage. ``groups`` / ``width_per_group`` make the 3x3 convolutions
    grouped, ResNeXt-style (FishNeXt).
    """

    stem_planes: int = 64
    tail_planes: tuple[int, int, int] = (128, 256, 512)
    body_planes: tuple[int, int, int] = (512, 384, 256)
    head_planes: tuple[int, int, int] = (320, 832, 1600)
    tail_blocks: tuple[int, int, int] = (2, 4, 8)
    bridge_blocks: int = 4
    body_blocks: tuple[int, int, int] = (2, 2, 2)
    head_blocks: tuple[int, int, int] = (2, 2, 4)
    body_transfer_blocks: tuple[int, int, int] = (2, 2, 2)
    head_transfer_blocks: tuple[int, int, int] = (2, 2, 4)
    groups: int = 1
    width_per_group: int = 64


class Bottleneck(nn.Module):
    """Pre-activation bottleneck: (BN-ReLU-conv) x 3 (1x1, 3x3, 1x1) plus a shortcut.

    The shortcut is the identity when channels match. Otherwise it is a BN-ReLU-1x1 projection,
    except in the first block of a body stage (``channel_sum=True``, the paper's UR-block), whose
    shortcut reduces ``in_ch`` to ``out_ch`` by summing each run of ``k = in_ch / out_ch``
    adjacent channels, so no isolated convolution breaks the gradient path.
    """

    def __init__(self, in_ch: int, out_ch: int, *, dilation: int = 1, groups: int = 1,
                 width_per_group: int = 64, channel_sum: bool = False):
        super().__init__()
        mid = int(out_ch // 4 * (width_per_group / 64)) * groups
        self.base_dilation = dilation
        self.k = in_ch // out_ch if channel_sum else 1
        if channel_sum and in_ch != self.k * out_ch:
            raise ValueError(f"UR-block needs in_ch to be a multiple of out_ch, got {in_ch} -> {out_ch}")
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.shortcut = None
        if in_ch != out_ch and not channel_sum:
            self.shortcut = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True),
                                          nn.Conv2d(in_ch, out_ch, 1, bias=False))

    def set_dilation_factor(self, factor: int) -> None:
        """Multiply the 3x3 dilation (output-stride surgery keeps the receptive field)."""
        d = self.base_dilation * factor
        self.conv2.dilation, self.conv2.padding = (d, d), (d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x), inplace=True))
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        out = self.conv3(F.relu(self.bn3(out), inplace=True))
        if self.k > 1:
            shortcut = x.unflatten(1, (-1, self.k)).sum(2)
        elif self.shortcut is not None:
            shortcut = self.shortcut(x)
        else:
            shortcut = x
        return out + shortcut


def _blocks(in_ch: int, out_ch: int, n: int, cfg: FishNetConfig, *, dilation: int = 1,
            channel_sum: bool = False) -> nn.Sequential:
    kw = dict(dilation=dilation, groups=cfg.groups, width_per_group=cfg.width_per_group)
    return nn.Sequential(Bottleneck(in_ch, out_ch, channel_sum=channel_sum, **kw),
                         *[Bottleneck(out_ch, out_ch, **kw) for _ in range(n - 1)])


def _bn_relu_conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class TailStage(nn.Module):
    """Residual blocks, then 2x2 max-pool (down-sampling)."""

    def __init__(self, blocks: nn.Sequential):
        super().__init__()
        self.blocks = blocks
        self.resample = nn.MaxPool2d(2, stride=2)


class Bridge(nn.Module):
    """Between tail and body: widen to 2C, then blocks back to C gated by an SE-like attention.

    ``out = blocks(s) * att + att`` with ``s = expand(x)`` and ``att = attention(s)`` (C x 1 x 1).
    """

    def __init__(self, ch: int, n_blocks: int, cfg: FishNetConfig):
        super().__init__()
        self.expand = nn.Sequential(*_bn_relu_conv_bn_relu(ch, ch // 2), nn.Conv2d(ch // 2, 2 * ch, 1))
        self.blocks = _blocks(2 * ch, ch, n_blocks, cfg)
        self.attention = nn.Sequential(nn.BatchNorm2d(2 * ch), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                                       nn.Conv2d(2 * ch, ch // 16, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(ch // 16, ch, 1), nn.Sigmoid())


class RefineStage(nn.Module):
    """A body (UR) or head (DR) stage: ``cat(resample(blocks(x)), transfer(earlier_map))``."""

    def __init__(self, blocks: nn.Sequential, transfer: nn.Sequential, resample: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.transfer = transfer
        self.resample = resample


class FishNet(nn.Module):
    """FishNet classifier and multi-scale feature extractor.

    Args:
        cfg: channels and depths of the variant (see the registered factories).
        num_classes: classifier outputs; 0 makes ``forward`` return the pooled pre-logits.
        in_channels: input image channels.
        output_stride: 32 (the authors' network), 16 or 8: the last down-samplings are removed
            and the convolutions that now see a finer map are dilated to keep their receptive field.
        features_only: drop the score layers; ``forward`` returns ``forward_features``.
        frozen_stages: freeze the first N stages of ``STAGE_NAMES`` (weights and BN statistics).
        freeze_bn: keep every BatchNorm in eval mode with frozen affine parameters.
        grad_checkpointing: recompute block activations in backward to save memory.
    """

    def __init__(self, cfg: FishNetConfig, *, num_classes: int = 1000, in_channels: int = 3,
                 output_stride: int = 32, features_only: bool = False, frozen_stages: int = 0,
                 freeze_bn: bool = False, grad_checkpointing: bool = False):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not 0 <= frozen_stages <= len(STAGE_NAMES):
            raise ValueError(f"frozen_stages must be in 0..{len(STAGE_NAMES)}, got {frozen_stages}")
        self.cfg, self.num_classes, self.in_channels = cfg, num_classes, in_channels
        self.features_only, self.frozen_stages, self.freeze_bn = features_only, frozen_stages, freeze_bn
        self.grad_checkpointing = grad_checkpointing

        c0 = cfg.stem_planes
        self.stem = nn.Sequential(OrderedDict(
            conv1=_conv_bn_relu(in_channels, c0 // 2, stride=2),
            conv2=_conv_bn_relu(c0 // 2, c0 // 2),
            conv3=_conv_bn_relu(c0 // 2, c0)))
        self.stem_pool = nn.MaxPool2d(3, stride=2, padding=1)

        # Channels and (original) stride of every map f0..f10, built alongside the stages.
        chs, strides = [c0], [4]
        self.tail = nn.ModuleList()
        for planes, n in zip(cfg.tail_planes, cfg.tail_blocks):
            self.tail.append(TailStage(_blocks(chs[-1], planes, n, cfg)))
            chs.append(planes), strides.append(strides[-1] * 2)

        self.bridge = Bridge(chs[-1], cfg.bridge_blocks, cfg)
        chs.append(chs[-1]), strides.append(strides[-1])

        self.body = nn.ModuleList()
        for u, (planes, n, nt, src) in enumerate(zip(cfg.body_planes, cfg.body_blocks,
                                                      cfg.body_transfer_blocks, BODY_TRANSFER_FROM)):
            if chs[-1] % planes:
                raise ValueError(f"body stage {u}: {chs[-1]} input channels are not a multiple of {planes}")
            blocks = _blocks(chs[-1], planes, n, cfg, dilation=2**u, channel_sum=True)
            self.body.append(RefineStage(blocks, _blocks(chs[src], chs[src], nt, cfg),
                                         nn.Upsample(scale_factor=2, mode="nearest")))
            chs.append(planes + chs[src]), strides.append(strides[-1] // 2)

        self.head = nn.ModuleList()
        for planes, n, nt, src in zip(cfg.head_planes, cfg.head_blocks, cfg.head_transfer_blocks,
                                      HEAD_TRANSFER_FROM):
            self.head.append(RefineStage(_blocks(chs[-1], planes, n, cfg), _blocks(chs[src], chs[src], nt, cfg),
                                         nn.MaxPool2d(2, stride=2)))
            chs.append(planes + chs[src]), strides.append(strides[-1] * 2)
        self._map_channels, self._map_strides = chs, strides

        # Maps for dense heads: the stem's last conv (stride 2; nothing else exists there), then the
        # last body map (stride 4) and the three head maps (8, 16, 32). Body and head maps are the
        # richest at their stride: each concatenates the trunk with every earlier resolution.
        self._feature_maps = ((None, c0, 2, "stem"), (7, chs[7], 4, "body.2"), (8, chs[8], 8, "head.0"),
                              (9, chs[9], 16, "head.1"), (10, chs[10], 32, "head.2"))

        if not features_only:
            self.pre_logits = nn.Sequential(*_bn_relu_conv_bn_relu(chs[-1], chs[-1] // 2))
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Conv2d(chs[-1] // 2, num_classes, 1) if num_classes > 0 else nn.Identity()
            self.num_features = chs[-1] // 2
        self._init_weights()
        self.output_stride = 32
        self.set_output_stride(output_stride)
        self._apply_freezing()

    # ----------------------------------------------------------------- configuration
    @property
    def feature_info(self) -> list[dict]:
        """Maps returned by ``forward_features``: channels, reduction (stride) and module name."""
        return [dict(num_chs=c, reduction=min(s, self.output_stride), module=m)
                for _, c, s, m in self._feature_maps]

    def set_output_stride(self, output_stride: int) -> None:
        """Replace the last down-samplings by dilation so the coarsest map has this stride.

        FishNet changes resolution in pooling, up-sampling and cross-stage concatenation, so this
        switches off every resampling whose two sides both fall at or below ``output_stride``
        and dilates every 3x3 convolution by (original stride / new stride) of the map it sees.
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        s, eff = self._map_strides, lambda stride: min(stride, output_stride)
        factor = lambda stride: stride // eff(stride)

        def dilate(seq, stride):
            for block in seq:
                block.set_dilation_factor(factor(stride))

        for t, stage in enumerate(self.tail):  # blocks at f_t's stride, pool to f_{t+1}
            dilate(stage.blocks, s[t])
            stage.resample = nn.MaxPool2d(2, stride=2) if eff(s[t]) != eff(s[t + 1]) else nn.Identity()
        dilate(self.bridge.blocks, s[4])
        for u, stage in enumerate(self.body):  # blocks at f_{4+u}'s stride, up-sample to f_{5+u}
            dilate(stage.blocks, s[4 + u])
            dilate(stage.transfer, s[BODY_TRANSFER_FROM[u]])
            up = eff(s[4 + u]) != eff(s[5 + u])
            stage.resample = nn.Upsample(scale_factor=2, mode="nearest") if up else nn.Identity()
        for h, stage in enumerate(self.head):  # blocks at f_{7+h}'s stride, pool to f_{8+h}
            dilate(stage.blocks, s[7 + h])
            dilate(stage.transfer, s[HEAD_TRANSFER_FROM[h]])
            stage.resample = nn.MaxPool2d(2, stride=2) if eff(s[7 + h]) != eff(s[8 + h]) else nn.Identity()
        self.output_stride = output_stride

    def stages(self) -> list[nn.Module]:
        """Stages in forward order, matching ``STAGE_NAMES`` (the unit of ``frozen_stages``)."""
        return [self.stem, *self.tail, self.bridge, *self.body, *self.head]

    def _apply_freezing(self) -> None:
        for stage in self.stages()[: self.frozen_stages]:
            stage.requires_grad_(False)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.requires_grad_(False)

    def train(self, mode: bool = True) -> FishNet:
        """Like ``nn.Module.train``, but frozen stages and frozen BN keep their statistics fixed."""
        super().train(mode)
        if mode:
            frozen = self.stages()[: self.frozen_stages] if not self.freeze_bn else [self]
            for part in frozen:
                for m in part.modules():
                    if isinstance(m, _BatchNorm):
                        m.eval()
        return self

    def _init_weights(self) -> None:
        # The authors' initialisation: He-normal over fan-out, BN at identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(getattr(self, "fc", None), nn.Conv2d):
            # Their fan-out rule gives the classifier std sqrt(2 / num_classes): 0.045 at 1000 classes but
            # 0.7 at 4, where training then starts from huge logits. A small classifier init suits both.
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.fc.bias)

    # ----------------------------------------------------------------- forward
    def _run(self, seq: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(seq, x, use_reentrant=False)
        return seq(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FishNet expects input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w, m = *x.shape[-2:], self.output_stride
        if h % m or w % m:
            raise ValueError(f"FishNet (output stride {m}) needs height and width divisible by {m}, got {h}x{w}; "
                             f"pad or resize the input, e.g. to {math.ceil(h / m) * m}x{math.ceil(w / m) * m}")

    def _forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the stem's stride-2 map and f0..f10."""
        self._check_input(x)
        s2 = self.stem(x)
        f = [self.stem_pool(s2)]
        for stage in self.tail:
            f.append(stage.resample(self._run(stage.blocks, f[-1])))
        expanded = self.bridge.expand(f[-1])
        attention = self.bridge.attention(expanded)
        f.append(self._run(self.bridge.blocks, expanded) * attention + attention)
        for stage, src in zip([*self.body, *self.head], BODY_TRANSFER_FROM + HEAD_TRANSFER_FROM):
            trunk = stage.resample(self._run(stage.blocks, f[-1]))
            f.append(torch.cat([trunk, self._run(stage.transfer, f[src])], dim=1))
        return s2, f

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale maps for dense heads, described by ``feature_info``.

        For an ``N x C x H x W`` input (H, W multiples of ``output_stride``) returns five maps at strides
        2, 4, 8, 16, 32 (capped at ``output_stride``): the stem's last conv, the last body map and
        the three head maps (64, 320, 832, 1600, 2112 channels for FishNet-150).
        """
        s2, f = self._forward_maps(x)
        return [s2 if i is None else f[i] for i, *_ in self._feature_maps]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Score layer on the last head map: BN-ReLU-1x1-BN-ReLU, global pool, 1x1 classifier."""
        x = self.global_pool(self.pre_logits(x))
        return (x if pre_logits else self.fc(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_features(x)
        return self.forward_head(self._forward_maps(x)[1][-1])


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


# ----------------------------------------------------------------- registered variants
# The authors' configurations (models/net_factory.py); FishNeXt uses grouped 3x3 convolutions.
FISHNET99 = FishNetConfig(tail_blocks=(2, 2, 6), bridge_blocks=2, body_blocks=(1, 1, 1), head_blocks=(1, 2, 2),
                          body_transfer_blocks=(1, 1, 1), head_transfer_blocks=(1, 1, 4))
FISHNET150 = FishNetConfig()
FISHNET201 = FishNetConfig(tail_blocks=(3, 4, 12), bridge_blocks=4, body_blocks=(2, 2, 2), head_blocks=(2, 3, 10),
                           body_transfer_blocks=(2, 2, 2), head_transfer_blocks=(2, 2, 9))
# Same topology at a quarter of the width and one block per stage: for CPU quickstarts and tests.
FISHNET_TINY = FishNetConfig(stem_planes=32, tail_planes=(64, 128, 256), body_planes=(256, 192, 128),
                             head_planes=(160, 416, 800), tail_blocks=(1, 1, 2), bridge_blocks=1,
                             body_blocks=(1, 1, 1), head_blocks=(1, 1, 1), body_transfer_blocks=(1, 1, 1),
                             head_transfer_blocks=(1, 1, 1))


# Every registered variant's config by name (what the smp encoders are built from).
VARIANT_CONFIGS = {
    "fishnet99": FISHNET99, "fishnet150": FISHNET150, "fishnet201": FISHNET201, "fishnet_tiny": FISHNET_TINY,
    **{f"fishnext{depth}_32x4d": replace(cfg, groups=32, width_per_group=4)
       for depth, cfg in ((99, FISHNET99), (150, FISHNET150), (201, FISHNET201))},
}


def _build(cfg: FishNetConfig, groups: int | None = None, width_per_group: int | None = None, **kwargs) -> FishNet:
    if groups is not None or width_per_group is not None:
        cfg = replace(cfg, groups=groups or cfg.groups, width_per_group=width_per_group or cfg.width_per_group)
    return FishNet(cfg, **kwargs)


@register_backbone
def fishnet99(**kwargs) -> FishNet:
    """FishNet-99: 16.63M parameters, 4.31 GFLOPs at 224x224. ``kwargs`` go to ``FishNet``."""
    return _build(FISHNET99, **kwargs)


@register_backbone
def fishnet150(**kwargs) -> FishNet:
    """FishNet-150: 24.96M parameters, 6.45 GFLOPs at 224x224. ``kwargs`` go to ``FishNet``."""
    return _build(FISHNET150, **kwargs)


@register_backbone
def fishnet201(**kwargs) -> FishNet:
    """FishNet-201: 44.58M parameters, 10.58 GFLOPs at 224x224. ``kwargs`` go to ``FishNet``."""
    return _build(FISHNET201, **kwargs)


@register_backbone
def fishnext99_32x4d(**kwargs) -> FishNet:
    """FishNeXt-99 with 32 groups of width 4 in every 3x3 convolution (ResNeXt-style)."""
    return _build(FISHNET99, **{"groups": 32, "width_per_group": 4, **kwargs})


@register_backbone
def fishnext150_32x4d(**kwargs) -> FishNet:
    """FishNeXt-150 with 32 groups of width 4 in every 3x3 convolution (ResNeXt-style)."""
    return _build(FISHNET150, **{"groups": 32, "width_per_group": 4, **kwargs})


@register_backbone
def fishnext201_32x4d(**kwargs) -> FishNet:
    """FishNeXt-201 with 32 groups of width 4 in every 3x3 convolution (ResNeXt-style)."""
    return _build(FISHNET201, **{"groups": 32, "width_per_group": 4, **kwargs})


@register_backbone
def fishnet_tiny(**kwargs) -> FishNet:
    """A small FishNet of the same topology (about 2M parameters) for CPU quickstarts and tests."""
    return _build(FISHNET_TINY, **kwargs)
