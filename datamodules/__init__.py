"""Datamodules: one file per dataset, plus what they share in ``common``."""

import os

# albumentations asks the network for a newer version when imported; there is none to ask here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
