"""Who is calling: a principal from a bearer token or a client certificate, set for the RPC being served."""

import contextvars
import hashlib
import hmac
import logging
from collections.abc import Collection
from pathlib import Path

import grpc

from server.transport.errors import Unauthenticated, refuse
from server.transport.interceptors import responses, wrap_handler

log = logging.getLogger(__name__)

# Each RPC runs in its own asyncio task, so a value set while serving one RPC is seen by that RPC alone
# (and by the tasks it starts, which copy the context).
_PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar("lstmserve_principal", default="")


def current_principal() -> str:
    """The principal of the RPC being served; "" when authentication is off (every caller is the same)."""
    return _PRINCIPAL.get()


class TokenTable:
    """Bearer tokens as SHA-256 digests -> principal; the server never holds a token itself."""

    def __init__(self, entries: list[tuple[bytes, str]]):
        self._entries = entries

    @classmethod
    def load(cls, path: str | Path) -> "TokenTable":
        """Lines of '<sha256 hex of the token> <principal>'; '#' starts a comment."""
        entries, seen = [], set()
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            digest, _, principal = line.partition(" ")
            principal = principal.strip()
            try:
                raw = bytes.fromhex(digest)
            except ValueError:
                raw = b""
            if len(raw) != hashlib.sha256().digest_size or not principal:
                raise ValueError(f"{path}:{number}: expected '<token's sha256, 64 hex digits> <principal>'")
            if raw in seen:
                raise ValueError(f"{path}:{number}: this token hash is listed twice")
            seen.add(raw)
            entries.append((raw, principal))
        return cls(entries)

    def principal(self, token: str) -> str | None:
        """The token's principal, or None; compares against every entry in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, principal in self._entries:
            if hmac.compare_digest(digest, known):
                found = principal
        return found


class Authenticator:
    """A bearer token names the principal when present; else, under mutual TLS, the certificate's identity."""

    def __init__(self, tokens_file: str = "", client_certificates: bool = False):
        self._tokens_file = tokens_file
        self._tokens = TokenTable.load(tokens_file) if tokens_file else None
        self._client_certificates = client_certificates

    def reload(self) -> None:
        """Reads the tokens file again; on failure the previous tokens stay in force."""
        if self._tokens_file:
            self._tokens = TokenTable.load(self._tokens_file)

    def principal(self, metadata, auth_context: dict) -> str:
        """The caller's principal, or Unauthenticated saying what is missing (never echoing a token)."""
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is not None and self._tokens is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the 'authorization' metadata must be 'Bearer <token>'")
            principal = self._tokens.principal(token.strip())
            if principal is None:
                raise Unauthenticated("the bearer token is not valid")
            return principal
        # gRPC names a verified client certificate's subject even when it is empty
        if self._client_certificates and "x509_subject" in auth_context:
            return certificate_principal(auth_context)
        wanted = " or ".join(name for name, on in (("a bearer token ('authorization: Bearer <token>')",
                                                    self._tokens is not None),
                                                   ("a client certificate", self._client_certificates)) if on)
        raise Unauthenticated(f"this server requires credentials: {wanted}")


# gRPC's auth context properties a client certificate's identity is read from, the first one found wins: the
# first URI SAN (a SPIFFE ID such as spiffe://trust-domain/ns/x/sa/y; SPIFFE, Istio and cert-manager issue
# workload certificates with it and often an empty subject), the subject ("CN=alice,O=team-a"), the first DNS SAN.
CERTIFICATE_IDENTITIES = ("peer_uri", "x509_subject", "peer_dns")


def certificate_principal(auth_context: dict) -> str:
    """The verified client certificate's identity. One that names none is refused: identity-less certificates
    must not share a principal with each other, nor with "" (every caller, when authentication is off)."""
    for name in CERTIFICATE_IDENTITIES:
        values = auth_context.get(name)
        if values and values[0]:
            return values[0].decode()
    raise Unauthenticated("the client certificate names no identity: it needs a URI SAN (a SPIFFE ID), "
                          "a subject or a DNS SAN")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a principal (UNAUTHENTICATED) and makes the principal current for the others."""

    def __init__(self, authenticator: Authenticator, open_services: Collection[str] = ()):
        self._authenticator = authenticator
        self._open_services = frozenset(open_services)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.split("/")[1] in self._open_services:
            return handler
        return wrap_handler(handler, lambda b: self._unary(b, method), lambda b: self._streaming(b, method))

    def _unary(self, behavior, method: str):
        async def authenticated(request, context):
            if not self._authenticate(context, method):
                return None
            return await behavior(request, context)
        return authenticated

    def _streaming(self, behavior, method: str):
        async def authenticated(request, context):
            if not self._authenticate(context, method):
                return
            async for response in responses(behavior, request, context):
                yield response
        return authenticated

    def _authenticate(self, context, method: str) -> bool:
        """Makes the caller's principal current; False when the call is refused (and ends UNAUTHENTICATED)."""
        try:
            principal = self._authenticator.principal(context.invocation_metadata(), context.auth_context())
        except Unauthenticated as error:
            log.info("refused %s from %s: %s", method, context.peer(), error)
            refuse(context, error)
            return False
        log.debug("%s called by principal %r", method, principal)
        _PRINCIPAL.set(principal)
        return True
