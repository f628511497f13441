"""The authors' released FishNet weights by name: ``fishnet99``, ``fishnet150`` (= ``fishnet150.in1k``),
``fishnet150.welltrained_in1k``, ``fishnet201`` (= ``fishnet201.welltrained_in1k``); ``weight_names()`` lists them.

Each name is a timm pretrained tag whose ``pretrained_cfg["url"]`` is the authors' file (``RELEASED``). The file
is downloaded once into torch's hub cache (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``),
under the file name of its URL, and checked before every use: its sha256 where ``FILE_SHA256`` records one, and
always its key layout and every shape against the variant. A file put at that path by hand is used without any
network. A file that fails the check is moved aside (``<file>.bad``), so it is never used again, and the error says
what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg, resolve_pretrained_cfg

from fishnet_pl.checkpoint import read_state_dict
from fishnet_pl.models.architecture import VARIANT_CONFIGS
from fishnet_pl.models.official import _full_layout, to_our_layout

log = logging.getLogger(__name__)

# The authors' released ImageNet-1k classifiers (the "Models" tables of github.com/kevin-ssy/FishNet's README) as
# timm tags, which ``fishnet.py`` registers; a variant's first tag is its default (``fishnet150``: ``fishnet150.in1k``).
# Their Dropbox share links serve the file itself with ``dl=1``; this module downloads, checks and caches them.
# FishNet-201 was released only "well-trained" (its plain row still reads "Available Soon"). Top-1 / top-5 are the
# authors' (224 centre crop).
_DROPBOX = "https://www.dropbox.com/s/"
RELEASED = {
    "fishnet99.in1k": dict(
        url=_DROPBOX + "hvojbdsad5ue7yb/fishnet99_ckpt.tar?dl=1", description="trained without tricks: 77.41 / 93.59",
        notes=("Baidu Yun mirror: https://pan.baidu.com/s/11U3sRod1VfbDBRbmXph6KA",)),
    "fishnet150.in1k": dict(
        url=_DROPBOX + "hjadcef18ln3o2v/fishnet150_ckpt.tar?dl=1", description="trained without tricks: 78.14 / 93.95",
        notes=("Baidu Yun mirror: https://pan.baidu.com/s/1uOEFsBHIdqpDLrbfCZJGUg",)),
    "fishnet150.welltrained_in1k": dict(
        url=_DROPBOX + "ajy9p6f97y45f1r/fishnet150_ckpt_welltrained.tar?dl=1",
        description="cosine LR, 200 epochs, label smoothing: 79.35 / 94.75",
        notes=("Baidu Yun mirror: https://pan.baidu.com/s/1pt31cp-xGcsRJKZAPcp4yQ",)),
    "fishnet201.welltrained_in1k": dict(
        url=_DROPBOX + "kvz2dmxe3fzn10m/fishnet201_ckpt_welltrain.tar?dl=1",
        description="cosine LR, 200 epochs, label smoothing: 79.71 / 94.79"),
}
# sha256 of each released file, checked before every use once recorded here. None: not recorded yet (the layout and
# every shape are checked anyway); write in the digest of a file downloaded from the URL above.
FILE_SHA256: dict[str, str | None] = dict.fromkeys(RELEASED)


def weight_names() -> list[str]:
    """The names ``resolve_weights`` knows: each FishNet tag with a URL, and the bare variant for its default tag."""
    names = []
    for tag in timm.list_pretrained():
        arch = tag.split(".")[0]
        if _released_cfg(tag) is not None:
            names += [tag] if arch in names else [arch, tag]
    return names


def resolve_weights(name_or_path: str | os.PathLike, model_name: str | None = None, *,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> str:
    """A weights file: ``name_or_path`` itself if it is a file, else the checked local copy of the released weights
    of that name (downloaded on first use, see the module docstring). With ``model_name`` (the timm model they are
    for), released weights of another variant are refused before any download."""
    if os.path.isfile(name_or_path):
        return os.fspath(name_or_path)
    cfg = _released_cfg(os.fspath(name_or_path))
    if cfg is None:
        raise FileNotFoundError(f"{name_or_path}: no such file, and not the name of released weights "
                                f"(those are: {', '.join(weight_names())})")
    if model_name is not None and model_name.split(".")[0] != cfg.architecture:
        raise ValueError(f"{name_or_path}: these are weights of {cfg.architecture}, not of {model_name}; "
                         f"choose {cfg.architecture} as the model, or weights of {model_name}")
    return os.fspath(cached_file(cfg, cache_dir=cache_dir, progress=progress))


def cache_path(cfg: PretrainedCfg, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the file of ``cfg["url"]`` is cached: the file name of the URL in ``cache_dir`` or torch's hub cache
    (the same file ``torch.hub.load_state_dict_from_url`` would use)."""
    folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / os.path.basename(urlparse(cfg.url).path)


def cached_file(cfg: PretrainedCfg, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The checked local copy of the file at ``cfg.url``, downloaded first if it is not cached yet."""
    path, tag = cache_path(cfg, cache_dir), f"{cfg.architecture}.{cfg.tag}"
    if path.is_file():
        _check(path, path, cfg, tag)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.download")  # renamed once checked: the cache holds good files
    log.info("downloading the %s weights from %s to %s", tag, cfg.url, path)
    try:
        torch.hub.download_url_to_file(cfg.url, os.fspath(partial), progress=progress)
    except (OSError, http.client.HTTPException) as err:  # refused, DNS, timeout, HTTP error status, cut off
        partial.unlink(missing_ok=True)
        raise ConnectionError(f"could not download the {tag} weights from {cfg.url} ({type(err).__name__}: {err}).\n"
                              f"  {_by_hand(cfg, path)}") from None
    _check(partial, path, cfg, tag)
    os.replace(partial, path)
    return path


def with_local_file(variant: str, pretrained_cfg=None, pretrained_cfg_overlay: dict | None = None,
                    cache_dir: str | os.PathLike | None = None) -> PretrainedCfg:
    """timm's pretrained_cfg for ``timm.create_model(variant, pretrained=True, ...)`` with its released file fetched
    and checked here, and ``file`` pointing at the local copy (so timm loads it without downloading). A cfg whose
    weights come from elsewhere (a ``file``, a ``state_dict``, the Hugging Face hub) is returned as timm resolves it."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
    if cfg.file or cfg.state_dict or cfg.hf_hub_id or not cfg.url:
        return cfg
    return dataclasses.replace(cfg, file=os.fspath(cached_file(cfg, cache_dir=cache_dir)))


def _released_cfg(name: str) -> PretrainedCfg | None:
    """The pretrained_cfg of a FishNet name or tag that has a URL, else None."""
    if name.split(".")[0] not in VARIANT_CONFIGS:
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # a FishNet with a tag timm does not know
        return None
    return cfg if cfg is not None and cfg.url else None


def _check(file: Path, path: Path, cfg: PretrainedCfg, tag: str) -> None:
    """Check ``file`` (the cached ``path`` or its download); a bad one is moved aside and reported."""
    problem = _problem(file, cfg, tag)
    if problem is None:
        return
    bad = path.with_name(path.name + ".bad")
    os.replace(file, bad)
    raise ValueError(f"the {tag} weights file {path} (from {cfg.url}) is unusable: {problem}.\n"
                     f"  It was moved to {bad} and will not be used. Run again to download it anew, or put a good "
                     f"copy at {path}.")


def _problem(file: Path, cfg: PretrainedCfg, tag: str) -> str | None:
    """What is wrong with ``file`` as the weights of ``cfg``: its sha256 (where recorded), format, keys, shapes."""
    expected = FILE_SHA256.get(tag)
    if expected:
        digest = _sha256(file)
        if digest != expected.lower():
            return f"its sha256 is {digest}, the released file's is {expected} (an incomplete, altered or other file)"
    try:
        state = read_state_dict(file)
    except ValueError as err:  # truncated (zip or pickle), an HTML error page, ...: the reader says which
        return str(err).removeprefix(f"{file}: ")
    arch_cfg = VARIANT_CONFIGS[cfg.architecture]
    try:
        state = to_our_layout(state, arch_cfg)
    except ValueError as err:
        return f"{err} (is it another model's file?)"
    layout = _full_layout(arch_cfg)
    missing = [k for k in layout if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k}: file {tuple(v.shape)}, model {tuple(layout[k])}" for k, v in state.items()
                  if v.shape != layout[k]]
    if missing or mismatched:
        return (f"not the layout of {cfg.architecture}: {len(missing)} tensors missing {missing[:4]}, "
                f"{len(mismatched)} of another shape {mismatched[:4]}")
    return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _by_hand(cfg: PretrainedCfg, path: Path) -> str:
    return f"Without network: download {cfg.url} elsewhere and put the file at {path}; it is then used from there."
