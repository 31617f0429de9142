"""lstmserve server: transport (gRPC) -> engine (sessions, batching) -> model runtime (TorchScript)."""
