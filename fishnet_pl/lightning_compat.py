"""What fishnet-pl uses of Lightning, torchmetrics and LitData beyond their public API, and why: each item breaks
silently when its library changes it, so ``pyproject.toml`` bounds these libraries (and timm and
segmentation-models-pytorch) below their next minor release, and an upgrade is a deliberate, tested change
(the whole suite; the resume tests above all: ``pytest tests/test_classification_run.py tests/test_preemption.py
tests/test_segmentation_run.py tests/test_streaming.py``).

- ``strategy._layer_sync`` (Lightning; ``sync_batchnorm_requested`` here, used by ``FishNetModule.setup``): the
  only record of ``Trainer(sync_batchnorm=True)`` before the strategy converts the BatchNorms, which torch then
  refuses on the CPU with no hint what to change; the module stops first with a message naming the option.
- ``ModelCheckpoint._find_last_checkpoints`` (Lightning; ``fishnet_pl.cli``): the files Lightning's own
  ``--ckpt_path last`` would take, so ours takes the newest of those and of the run folders' checkpoints.
- The checkpoint's loop states (Lightning; ``fishnet_pl.callbacks.RNGStateCheckpoint.on_load_checkpoint``): the
  fit loop saves rank 0's train-loader states under ``loops`` -> its ``state_dict`` -> ``combined_loader`` and
  loads them into every process; the callback puts each process's own there before the loop reads them.
- ``Metric._apply`` and ``Metric._sync_dist`` (torchmetrics; ``fishnet_pl.metrics``): a metric whose states are
  Python records (numpy masks, RLEs) must keep them off the device and gather them with
  ``all_gather_object``, as torchmetrics' own ``MeanAveragePrecision`` does with its RLE masks.
- ``StreamingDataLoader.restore`` (LitData; ``datamodules.streaming.ResumableStreamingDataLoader``): LitData
  replays a restored position until an iteration is exhausted, which Lightning never does (it stops after
  ``len(loader)`` batches); clearing the flag starts the next epoch afresh.

Known Lightning issues that touch resuming:

- #20550: asking ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` loads the train dataloader
  before the checkpoint is restored, and its saved state is then never loaded. ``FishNetModule`` asks only in
  ``on_train_start`` (``LRFactor.set_length``), so Lightning loads the loader, and its state, itself.
- #21938 (open; fix proposed in #21941): a run resumed after epoch 0 with a ``DistributedSampler`` and loading
  workers builds its first iterator before the sampler's epoch is set, so its first epoch takes epoch 0's order.
  A public-API workaround does not exist (the iterator lives in the fit loop); single-process runs are not
  affected (``datamodules.common.ResumableRandomSampler`` draws its order from the checkpointed random state).
"""

from __future__ import annotations

from typing import Any


def sync_batchnorm_requested(strategy: Any) -> bool:
    """Whether the trainer was given ``sync_batchnorm=True`` (its strategy will convert every BatchNorm)."""
    return getattr(strategy, "_layer_sync", None) is not None
