"""The image service: `python -m distrifusion task=serve`."""
