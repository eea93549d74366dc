"""recdata: review dumps -> leakage-free rating-prediction examples (pure Python + numpy)."""
