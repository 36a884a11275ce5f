"""Open data platform for curating image-text pretraining sets."""

__version__ = "0.1.0"
