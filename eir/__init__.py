"""open EIR: a network-side Equipment Identity Register speaking Diameter S13."""

__version__ = "0.1.0"
