"""raypose: the Li & Chan (ACCV 2014) multi-task 3D pose network on Ray Train and Ray Tune."""

__version__ = "0.1.0"
