"""The version of pyro-reactor, in one place for setup.cfg and ``ping``."""

__version__ = "0.1.0"
