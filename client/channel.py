"""Channels for both clients: plaintext, or TLS with optional client certificate and bearer token."""

import dataclasses
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # reconnect within our own retry backoff, not gRPC's default of up to two minutes
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000),
                   # with several addresses: use the first that answers, move on when it fails
                   ("grpc.lb_policy_name", "pick_first")]


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What the client trusts and presents. Any field set means TLS; none set means plaintext."""

    root_certificates: str | None = None  # PEM file of the CA(s) that signed the server's certificate
    certificate_chain: str | None = None  # PEM client certificate, for mutual TLS
    private_key: str | None = None  # PEM key of certificate_chain
    token: str | None = None  # bearer token, sent as 'authorization: Bearer <token>' on every call
    server_name: str | None = None  # name the server's certificate must carry, if not the address's host
    tls: bool = False  # TLS even with no other field set (the system's root certificates)

    def __post_init__(self):
        if bool(self.certificate_chain) != bool(self.private_key):
            raise ValueError("a client certificate and its private key go together")

    @property
    def secure(self) -> bool:
        return self.tls or any((self.root_certificates, self.certificate_chain, self.token, self.server_name))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return Path(path).read_bytes() if path else None

        tls = grpc.ssl_channel_credentials(read(self.root_certificates), read(self.private_key),
                                           read(self.certificate_chain))
        if not self.token:
            return tls
        # gRPC sends call credentials only over TLS, so a token never travels in clear text.
        return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(self.token))


def target(address: str) -> str:
    """gRPC's target for `address`; 'ip:port,ip:port' becomes one channel over every address, in order."""
    if "," not in address:
        return address
    scheme = "ipv6" if address.startswith("[") else "ipv4"
    return f"{scheme}:{address.replace(' ', '')}"


def open_channel(grpc_module, address: str, credentials: Credentials | None):
    """A channel from `grpc` or `grpc.aio`, which share this interface."""
    address = target(address)
    if credentials is None or not credentials.secure:
        return grpc_module.insecure_channel(address, options=CHANNEL_OPTIONS)
    options = CHANNEL_OPTIONS
    if credentials.server_name:
        options = [*options, ("grpc.ssl_target_name_override", credentials.server_name)]
    return grpc_module.secure_channel(address, credentials.channel_credentials(), options=options)
