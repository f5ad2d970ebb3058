"""essa: efficient self-supervised adaptation of vision foundation models to medical imaging."""

__version__ = "0.1.0"
