"""REIR data: one in-memory dataset, three readers, validation."""

from .canonical import read_canonical, write_canonical
from .coco import DataError
from .dataset import Dataset, Expression, Image, Instance, Problem, gallery_split
from .loader import FORMATS, detect_format, load_dataset
from .validate import drop_invalid, validate

__all__ = [
    "FORMATS",
    "DataError",
    "Dataset",
    "Expression",
    "Image",
    "Instance",
    "Problem",
    "detect_format",
    "drop_invalid",
    "gallery_split",
    "load_dataset",
    "read_canonical",
    "validate",
    "write_canonical",
]
