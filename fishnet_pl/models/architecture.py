"""FishNet (Sun et al., NeurIPS 2018), built exactly as the authors' code builds it: the network alone.

The family in layers, each importing only those before it: this architecture, the authors' checkpoint
layout mapped onto it (``official.py``), their released weights (``pretrained.py``), and the variants
registered in timm (``fishnet.py``).

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

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from timm.models import register_notrace_function, register_notrace_module
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

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
            shortcut = channel_sum(x, self.k)
        elif self.shortcut is not None:
            shortcut = self.shortcut(x)
        else:
            shortcut = x
        # In place: conv3's output is needed by no backward, and a fresh full-size sum costs ~10% of inference.
        return out.add_(shortcut)


@register_notrace_function  # FX: a leaf, as it branches on autograd
def channel_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum each run of ``k`` adjacent channels (the UR-block's shortcut)."""
    runs = x.unflatten(1, (-1, k))
    if x.requires_grad and torch.is_grad_enabled():
        return runs.sum(2)  # its backward (one expand) is the cheaper one in training
    # Without autograd, adding the k strided slices beats the reduction (2x in NCHW, 13x in channels_last:
    # ``python -m bench.ops``) and keeps channels_last (``sum`` returns NCHW, slowing the residual add after it).
    out = runs[:, :, 0] + runs[:, :, 1]
    for i in range(2, k):
        out += runs[:, :, i]
    return out


@register_notrace_module  # FX: a leaf, as it branches on autograd and sizes
class MaxPool2x2(nn.MaxPool2d):
    """2x2, stride-2 max-pooling, as ``nn.MaxPool2d(2, stride=2)``, with a faster inference path.

    Without autograd, on the CPU, the maximum of the four strided sub-grids is the same value as torch's
    kernel gives, 9x faster in NCHW (where torch's kernel loops per output element) and a bit faster in
    channels_last (``python -m bench.ops``). Training (which needs the kernel's indices), odd sizes, TorchScript
    and ONNX export take ``nn.MaxPool2d``'s path.
    """

    def __init__(self):
        super().__init__(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or (x.requires_grad and torch.is_grad_enabled()) or x.dim() != 4 or x.shape[2] % 2
                or x.shape[3] % 2 or x.device.type != "cpu"):
            return super().forward(x)
        rows = x.unflatten(2, (-1, 2))
        rows = torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class _NearestUp2x(torch.autograd.Function):
    """Nearest 2x up-sampling of an NCHW tensor by broadcasting; backward is torch's own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.input_size = x.shape
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.input_size
        return torch.ops.aten.upsample_nearest2d_backward(grad, [2 * h, 2 * w], [n, c, h, w], 2.0, 2.0)


@register_notrace_module  # FX: a leaf, as it branches on the layout
class Upsample2x(nn.Upsample):
    """Nearest 2x up-sampling, as ``nn.Upsample(scale_factor=2, mode="nearest")``, with a faster NCHW path.

    For NCHW input torch's CPU kernel converts to channels_last and back (two extra copies); copying the
    input by broadcasting writes the same values about 2x faster (``python -m bench.ops``). The gradient is
    torch's kernel's. channels_last input (where torch's kernel is fast), TorchScript and ONNX export take
    ``nn.Upsample``'s path.
    """

    def __init__(self):
        super().__init__(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or x.dim() != 4 or not x.is_contiguous() or x.device.type != "cpu"):
            return super().forward(x)
        return _NearestUp2x.apply(x)


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
        self.resample = MaxPool2x2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(self.blocks(x))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expanded = self.expand(x)
        attention = self.attention(expanded)
        return self.blocks(expanded) * attention + attention


class RefineStage(nn.Module):
    """A body (UR) or head (DR) stage: ``cat(resample(blocks(x)), transfer(earlier))``, where ``earlier``
    is the map of the same resolution from an earlier stage."""

    def __init__(self, blocks: nn.Sequential, transfer: nn.Sequential, resample: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.transfer = transfer
        self.resample = resample

    def forward(self, x: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.resample(self.blocks(x)), self.transfer(earlier)], dim=1)


class FishNet(nn.Module):
    """FishNet classifier and multi-scale feature extractor, a timm model.

    Built by timm's factory (``timm.create_model("fishnet150", ...)`` once ``fishnet_pl`` is imported),
    so ``features_only=True``, ``out_indices`` and ``pretrained_cfg`` behave as for any timm model.

    Args:
        cfg: channels and depths of the variant (``VARIANT_CONFIGS``).
        num_classes: classifier outputs; 0 makes ``forward`` return the pooled pre-logits.
        in_chans: input image channels.
        global_pool: "avg" (the authors' network) or "" (no pooling: ``forward`` returns maps).
        output_stride: 32 (the authors' network), 16 or 8: the last down-samplings are removed
            and the convolutions that now see a finer map are dilated to keep their receptive field.
        drop_rate: dropout before the classifier (0, the authors' network, has none).
        grad_checkpointing: recompute stage activations in backward to save memory.
    """

    def __init__(self, cfg: FishNetConfig, *, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 output_stride: int = 32, drop_rate: float = 0.0, grad_checkpointing: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(cfg, num_classes, in_chans, global_pool, drop_rate, grad_checkpointing)
        if dtype is not None:
            self.to(dtype=dtype)
        self.output_stride = 32
        self.set_output_stride(output_stride)

    def _build(self, cfg: FishNetConfig, num_classes: int, in_chans: int, global_pool: str, drop_rate: float,
               grad_checkpointing: bool) -> None:
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.cfg, self.num_classes, self.in_chans, self.drop_rate = cfg, num_classes, in_chans, drop_rate
        self.grad_checkpointing = grad_checkpointing

        c0 = cfg.stem_planes
        self.stem = nn.Sequential(OrderedDict(
            conv1=_conv_bn_relu(in_chans, c0 // 2, stride=2),
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
                                         Upsample2x()))
            chs.append(planes + chs[src]), strides.append(strides[-1] // 2)

        self.head = nn.ModuleList()
        for planes, n, nt, src in zip(cfg.head_planes, cfg.head_blocks, cfg.head_transfer_blocks,
                                      HEAD_TRANSFER_FROM):
            self.head.append(RefineStage(_blocks(chs[-1], planes, n, cfg), _blocks(chs[src], chs[src], nt, cfg),
                                         MaxPool2x2()))
            chs.append(planes + chs[src]), strides.append(strides[-1] * 2)
        self._map_channels, self._map_strides = chs, strides

        # Maps for dense heads (timm's feature_info, forward_intermediates' indices 0-4): the stem's last
        # conv (stride 2; nothing else exists there), the last body map (stride 4) and the three head maps
        # (8, 16, 32). Body and head maps are the richest at their stride: each concatenates the trunk
        # with every earlier resolution.
        self._feature_maps = ((None, c0, 2, "stem"), (7, chs[7], 4, "body.2"), (8, chs[8], 8, "head.0"),
                              (9, chs[9], 16, "head.1"), (10, chs[10], 32, "head.2"))

        # The authors' score layer: BN-ReLU-1x1-BN-ReLU (pre-logits, half the width), pool, 1x1 classifier.
        self.num_features = chs[-1]
        self.head_hidden_size = chs[-1] // 2
        self.pre_logits = nn.Sequential(*_bn_relu_conv_bn_relu(chs[-1], self.head_hidden_size))
        self.global_pool, self.fc = self._make_classifier(num_classes, global_pool)
        self._init_weights()

    # ----------------------------------------------------------------- timm's classifier interface
    def _make_classifier(self, num_classes: int, global_pool: str) -> tuple[nn.Module, nn.Module]:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        pool = nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.Identity()
        fc = nn.Conv2d(self.head_hidden_size, num_classes, 1) if num_classes > 0 else nn.Identity()
        if isinstance(fc, nn.Conv2d):
            # The authors' fan-out rule gives the classifier std sqrt(2 / num_classes): 0.045 at 1000 classes but
            # 0.7 at 4, where training then starts from huge logits. A small classifier init suits both.
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)
        return pool, fc

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none, ``forward`` gives pre-logits); ``global_pool``
        "avg" or "" (keep the maps), None keeps the current pooling."""
        if global_pool is None:
            global_pool = "avg" if isinstance(self.global_pool, nn.AdaptiveAvgPool2d) else ""
        self.num_classes = num_classes
        like = next(self.parameters())
        with torch.device(like.device):
            pool, fc = self._make_classifier(num_classes, global_pool)
        self.global_pool, self.fc = pool.train(self.training), fc.to(dtype=like.dtype).train(self.training)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's parameter groups: the stem, then each stage of ``STAGE_NAMES`` in forward order (the unit
        of ``frozen_stages`` in fishnet-pl, of layer-wise LR decay in timm); the score layers come last."""
        return _stage_ordinal

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ----------------------------------------------------------------- configuration
    def set_output_stride(self, output_stride: int) -> None:
        """Replace the last down-samplings by dilation so the coarsest map has this stride.

        FishNet changes resolution in pooling, up-sampling and cross-stage concatenation, so this
        switches off every resampling whose two sides both fall at or below ``output_stride``
        and dilates every 3x3 convolution by (original stride / new stride) of the map it sees.
        """
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if not len(self.tail):  # pruned to the stem (stride 2): nothing to change
            return
        s, eff = self._map_strides, lambda stride: min(stride, output_stride)
        factor = lambda stride: stride // eff(stride)

        def dilate(seq, stride):
            for block in seq:
                block.set_dilation_factor(factor(stride))

        for t, stage in enumerate(self.tail):  # blocks at f_t's stride, pool to f_{t+1}
            dilate(stage.blocks, s[t])
            stage.resample = MaxPool2x2() if eff(s[t]) != eff(s[t + 1]) else nn.Identity()
        dilate(self.bridge.blocks, s[4])
        for u, stage in enumerate(self.body):  # blocks at f_{4+u}'s stride, up-sample to f_{5+u}
            dilate(stage.blocks, s[4 + u])
            dilate(stage.transfer, s[BODY_TRANSFER_FROM[u]])
            up = eff(s[4 + u]) != eff(s[5 + u])
            stage.resample = Upsample2x() if up else nn.Identity()
        for h, stage in enumerate(self.head):  # blocks at f_{7+h}'s stride, pool to f_{8+h}
            dilate(stage.blocks, s[7 + h])
            dilate(stage.transfer, s[HEAD_TRANSFER_FROM[h]])
            stage.resample = MaxPool2x2() if eff(s[7 + h]) != eff(s[8 + h]) else nn.Identity()
        self.output_stride = output_stride
        self.feature_info = [dict(num_chs=c, reduction=min(r, output_stride), module=m)
                             for _, c, r, m in self._feature_maps]

    @property
    def input_size_multiple(self) -> int:
        """Input height and width must be multiples of this: the body and head concatenate each up-sampled or
        pooled map with a tail map of the same size (most timm models pool any size and declare nothing)."""
        return self.output_stride

    def stages(self) -> list[nn.Module]:
        """Stages in forward order, matching ``STAGE_NAMES``."""
        return [self.stem, *self.tail, self.bridge, *self.body, *self.head]

    def _init_weights(self) -> None:
        # The authors' initialisation: He-normal over fan-out, BN at identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.fc:
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------- forward
    def _call(self, stage: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, *inputs, use_reentrant=False)
        return stage(*inputs)

    def _forward_maps(self, x: torch.Tensor, last: int = 10) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem's stride-2 map and f0..f{last} (fewer when stages were pruned)."""
        check_input_size(x, self.in_chans, self.input_size_multiple)
        s2 = self._call(self.stem, x)
        f = [self.stem_pool(s2)]
        if last < 0:  # only the stem's map was asked for
            return s2, f
        for stage in self.tail:
            f.append(self._call(stage, f[-1]))
        if len(f) < 4 or last < 4:  # pruned after the stem
            return s2, f
        f.append(self._call(self.bridge, f[-1]))
        for stage, src in zip([*self.body, *self.head], BODY_TRANSFER_FROM + HEAD_TRANSFER_FROM):
            if len(f) > last:
                break
            f.append(self._call(stage, f[-1], f[src]))
        return s2, f

    def _map_index(self, feature_index: int) -> int:
        """The f0..f10 index of a ``feature_info`` map; -1 for the stem's stride-2 map (before f0)."""
        index = self._feature_maps[feature_index][0]
        return -1 if index is None else index

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API. Intermediates are the ``feature_info`` maps (indices 0-4: strides 2, 4, 8, 16, 32,
        capped at ``output_stride``; for FishNet-150 64, 320, 832, 1600, 2112 channels), the final output
        is ``forward_features``. ``indices``: the last n maps if an int, these if a list, all if None;
        ``stop_early`` stops after the last map asked for. ``norm`` has no effect (FishNet has no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"FishNet gives NCHW maps, not {output_fmt}")
        take, max_index = feature_take_indices(len(self._feature_maps), indices)
        last = self._map_index(max_index) if stop_early or intermediates_only else 10
        s2, f = self._forward_maps(x, last)
        intermediates = [s2 if self._feature_maps[i][0] is None else f[self._feature_maps[i][0]] for i in take]
        if intermediates_only:
            return intermediates
        return f[-1], intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last ``feature_info`` map in ``indices`` and, with ``prune_head``,
        the score layers (timm's features_only models call this)."""
        take, max_index = feature_take_indices(len(self._feature_maps), indices)
        last = self._map_index(max_index)
        if last < 4:
            self.tail, self.body, self.head = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            self.bridge = nn.Identity()
        else:
            self.head = self.head[: max(0, last - 7)]
        if prune_head:
            self.reset_classifier(0, "")
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.num_features
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last head map, unpooled: [N, ``num_features``, H / output_stride, W / output_stride]
        (after ``prune_intermediate_layers``, the last map kept)."""
        s2, f = self._forward_maps(x)
        return f[-1] if len(self.tail) else s2

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Score layer on the last head map: BN-ReLU-1x1-BN-ReLU, global pool, 1x1 classifier."""
        x = self.global_pool(self.pre_logits(x))
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        x = x if pre_logits else self.fc(x)
        return x.flatten(1) if isinstance(self.global_pool, nn.AdaptiveAvgPool2d) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_notrace_function  # a data-dependent check: a leaf for torch.fx (which only wraps public names)
def check_input_size(x: torch.Tensor, in_chans: int, output_stride: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"FishNet expects input of shape (N, {in_chans}, H, W), got {tuple(x.shape)}")
    h, w, m = *x.shape[-2:], output_stride
    if h % m or w % m:
        raise ValueError(f"FishNet (output stride {m}) needs height and width divisible by {m}, got {h}x{w}; "
                         f"pad or resize the input, e.g. to {math.ceil(h / m) * m}x{math.ceil(w / m) * m}")


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


# ----------------------------------------------------------------- the variants
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


def _stage_ordinal(name: str) -> float:
    """Position of a parameter's stage in ``STAGE_NAMES`` (score layers: last)."""
    for ordinal, stage in enumerate(STAGE_NAMES):
        if name == stage or name.startswith(stage + "."):
            return ordinal
    return math.inf
