"""The full detector: images in, image scores and anomaly maps out, saved to and loaded from one file."""

from .detector import CRDDetector

__all__ = ["CRDDetector"]
