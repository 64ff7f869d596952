"""mongarsd: a private AI daemon for small boards."""

__version__ = "0.1.0"
