"""guideflow: ControlNet guide images at scale."""

__version__ = "0.1.0"
