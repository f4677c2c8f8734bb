"""swaserve: disaggregated serving for hybrid sliding-window-attention models."""

__version__ = "0.1.0"
