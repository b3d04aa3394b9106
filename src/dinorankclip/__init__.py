"""DINORANKCLIP: vision-language pretraining with a frozen DINOv3 teacher and high-order ranking losses."""

__version__ = "0.1.0"
