"""kiln: train AI models end to end, from raw data to a served, quantized model."""

__version__ = "0.1.0"
