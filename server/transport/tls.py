"""The gRPC port's TLS certificate, key and client CA, read from files and re-read on demand (SIGHUP)."""

import ssl
import threading
from pathlib import Path

import grpc


class ServerCertificates:
    """Serves TLS from PEM files; with a client CA, clients must present a certificate it signed."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = ""):
        self._cert_file, self._key_file, self._client_ca_file = cert_file, key_file, client_ca_file
        self._initial = self._read()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # the fetcher runs on a gRPC thread

    def credentials(self) -> grpc.ServerCredentials:
        # Kept for the server's life: the port does not hold the Python object, and once the garbage collector
        # freed it (a full collection, e.g. main's gc.freeze after start-up) TLS handshakes failed with
        # "Handshake read failed (Endpoint closing)".
        self._credentials = grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=bool(self._client_ca_file))
        return self._credentials

    def reload(self) -> None:
        """Reads the files again: new connections get them, open connections (and their sessions) go on.

        Raises OSError or ValueError when the files cannot be read or do not fit; the previous ones stay."""
        config = self._read()
        with self._lock:
            self._pending = config

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before every TLS handshake: a new configuration once after a reload, else None."""
        with self._lock:
            config, self._pending = self._pending, None
        return config

    def _read(self) -> grpc.ServerCertificateConfiguration:
        # The ssl module checks what gRPC would only find out at the next handshake: that the files parse
        # and that the key belongs to the certificate.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self._cert_file, self._key_file)
        except ssl.SSLError as error:
            raise ValueError(f"{self._cert_file} and {self._key_file} are not a PEM certificate and its key "
                             f"({error})") from error
        client_ca = None
        if self._client_ca_file:
            try:
                context.load_verify_locations(self._client_ca_file)
            except ssl.SSLError as error:
                raise ValueError(f"{self._client_ca_file} holds no PEM CA certificate ({error})") from error
            client_ca = Path(self._client_ca_file).read_bytes()
        pair = (Path(self._key_file).read_bytes(), Path(self._cert_file).read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=client_ca)
