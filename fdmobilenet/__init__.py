"""FD-MobileNet: the model, its FLOPs check, configs, checkpoints, and the training engine."""
from .model import FDMobileNet, fd_mobilenet

__all__ = ["FDMobileNet", "fd_mobilenet"]
__version__ = "0.1.0"
