"""``fuse_for_inference``: an eval-only copy of a model that computes the same outputs faster.

FishNet's bottlenecks are pre-activation (BN-ReLU-conv) x 3: the BatchNorm before the 3x3 and before the
last 1x1 convolution directly follows a convolution, so in eval mode it is an affine map that folds into
that convolution's weights and bias (two of every three BatchNorms); so do the stem's conv-BN pairs and the
score layer's. The first BatchNorm of a block reads the residual sum and stays. The copy also runs in
channels_last, where oneDNN's convolutions are faster on the CPU than in NCHW (``python -m bench.backbones``
measures it). Max-pooling, up-sampling and the UR-blocks' channel sums take the model's own no-autograd
fast paths (``MaxPool2x2``, ``Upsample2x``, ``channel_sum``). The model itself is not modified, so
training is unaffected.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fishnet_pl.models.architecture import Bottleneck


def fuse_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` (a FishNet, a timm ``features_only`` FishNet, or a task network around
    one) with every BatchNorm that directly follows a convolution folded into it and, with ``channels_last``,
    its weights in channels_last memory format (inputs may stay NCHW; the first convolution switches).
    Outputs equal ``model.eval()``'s up to float rounding. Parameters are frozen: the copy is for inference
    and export only."""
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, Bottleneck):
            module.conv1, module.bn2 = fuse_conv_bn_eval(module.conv1, module.bn2), nn.Identity()
            module.conv2, module.bn3 = fuse_conv_bn_eval(module.conv2, module.bn3), nn.Identity()
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                conv, bn = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                    module._modules[first], module._modules[second] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused.requires_grad_(False)
