from fishnet_pl.tasks.base import TaskHead  # noqa: F401
from fishnet_pl.tasks.classification import ClassificationHead  # noqa: F401
from fishnet_pl.tasks.detection import DetectionHead  # noqa: F401
from fishnet_pl.tasks.multitask import MultiTaskHead  # noqa: F401
from fishnet_pl.tasks.panoptic import PanopticHead  # noqa: F401
from fishnet_pl.tasks.segmentation import SegmentationHead  # noqa: F401
