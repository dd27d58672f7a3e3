"""Segment Anything (SAM): model builders (real ViT-B/L/H from a local ``.pth``, or a tiny model
from config) and the forward pieces training and evaluation call (``models``)."""
