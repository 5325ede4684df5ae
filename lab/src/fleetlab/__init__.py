"""A lab of real Linux machines on one box: systemd-nspawn containers on a bridge."""

__version__ = "0.1.0"
