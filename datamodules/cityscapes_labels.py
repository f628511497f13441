"""Cityscapes' label table (cityscapesscripts' ``helpers/labels.py``): the label ids of the official files, the 19
training classes they map to, the official colours and the panoptic categories. Read by the datamodule
(``cityscapes``) and by the writer of the quickstart data (``quickstart_segmentation``).
"""

from __future__ import annotations

import numpy as np

from datamodules.segmentation import IGNORE_INDEX

# cityscapesscripts' helpers/labels.py: (name, label id, train id, colour) for label ids 0..33.
# ('license plate', id -1, is never written to the labelIds files: plates keep the car's id.)
LABELS = (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
)
assert [label_id for _, label_id, _, _ in LABELS] == list(range(34))  # row = label id, for the lookup table

# Index a labelIds array with it to get train ids (uint8: cv2 resizes it, ToTensorV2 keeps it compact).
LABEL_ID_TO_TRAIN_ID = np.array([train_id for _, _, train_id, _ in LABELS], dtype=np.uint8)
_TRAIN_LABELS = sorted((train_id, name, colour) for name, _, train_id, colour in LABELS if train_id != IGNORE_INDEX)
CLASS_NAMES = tuple(name for _, name, _ in _TRAIN_LABELS)  # index = train id
PALETTE = tuple(colour for _, _, colour in _TRAIN_LABELS)  # RGB per train id, the official colour coding

# labels.py's hasInstances: the instanceIds files give these classes' objects ids label id * 1000 + index.
HAS_INSTANCES = frozenset(range(24, 34))  # person .. bicycle, caravan and trailer included
# The panoptic benchmark's categories (createPanopticImgs): the classes evaluated (train id != 255), by label id, as
# COCO panoptic categories; 8 things (caravan and trailer, not evaluated, are void) and 11 stuff classes.
PANOPTIC_CATEGORIES = tuple(
    {"id": label_id, "name": name, "isthing": int(label_id in HAS_INSTANCES), "color": list(colour)}
    for name, label_id, train_id, colour in LABELS if train_id != IGNORE_INDEX)
