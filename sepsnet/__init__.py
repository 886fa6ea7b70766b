"""SE-PSNet panoptic segmentation toolkit."""

__version__ = "0.1.0"
