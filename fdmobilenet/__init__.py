"""FD-MobileNet: the model (fdmobilenet.model), its configs, checkpoints, and the training engine.

Nothing is imported here, so that ``import fdmobilenet.config`` (or cli, slurm_port) does not load torch."""
__version__ = "0.1.0"
