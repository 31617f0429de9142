"""gRPC transport: servicers that translate messages, interceptors, and the error -> status table."""
