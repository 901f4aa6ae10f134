"""coinyear: date a coin from two photos, and keep the model honest over time."""

__version__ = "0.1.0"
