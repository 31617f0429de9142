"""The model repository and the registry of loaded model versions (one engine each)."""
