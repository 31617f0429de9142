"""Certificates made at test time: a CA, server certificates for 127.0.0.1, client certificates by name."""

import dataclasses
import datetime
import hashlib
import ipaddress
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass(frozen=True)
class Issued:
    """A certificate and its key, written to `cert` and `key` (PEM)."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()


class CertificateAuthority:
    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(f"{name} test CA")
        self._subject = subject
        builder = _builder(subject, subject, self._key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True)
        self.certificate = builder.sign(self._key, hashes.SHA256())
        self.cert = directory / f"{name}-ca.pem"
        self.cert.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue_server(self, file_stem: str) -> Issued:
        """A server certificate valid for 127.0.0.1 and localhost."""
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                           x509.DNSName("localhost")])
        return self._issue(file_stem, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, san)

    def issue_client(self, common_name: str | None, uris: tuple[str, ...] = (), dns_names: tuple[str, ...] = (),
                     file_stem: str = "") -> Issued:
        """A client certificate with subject `CN=common_name` (None: an empty subject) and the given URI and
        DNS SANs; written to `client-<file_stem or common_name>.pem`.

        Empty subjects with the identity only in a SAN are how SPIFFE, Istio and cert-manager issue workload
        certificates; with no SAN either, the certificate names no identity at all."""
        names = [x509.UniformResourceIdentifier(uri) for uri in uris] + [x509.DNSName(n) for n in dns_names]
        return self._issue(f"client-{file_stem or common_name}", common_name, ExtendedKeyUsageOID.CLIENT_AUTH,
                           x509.SubjectAlternativeName(names) if names else None)

    def _issue(self, file_stem: str, common_name: str | None, usage, san) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([]) if common_name is None else _name(common_name)
        builder = _builder(subject, self._subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False)
        if san is not None:  # RFC 5280: critical when the subject is empty
            builder = builder.add_extension(san, critical=common_name is None)
        certificate = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self.directory / f"{file_stem}.pem", self.directory / f"{file_stem}.key")
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return issued


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lstmserve tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


@dataclasses.dataclass(frozen=True)
class Pki:
    """Everything a security test needs: two CAs, a server certificate, clients, and a tokens file."""

    ca: CertificateAuthority  # signs the server and the trusted clients
    other_ca: CertificateAuthority  # trusted by nobody here
    server: Issued
    alice: Issued
    bob: Issued
    mallory: Issued  # signed by other_ca
    tokens: dict[str, str]  # principal -> token
    tokens_file: Path


def make_pki(directory: Path) -> Pki:
    ca, other = CertificateAuthority(directory, "trusted"), CertificateAuthority(directory, "other")
    tokens = {name: secrets.token_urlsafe(32) for name in ("alice", "bob")}
    tokens_file = directory / "tokens.txt"
    tokens_file.write_text("# sha256 of the token, principal\n" + "".join(
        f"{hashlib.sha256(token.encode()).hexdigest()} {name}\n" for name, token in tokens.items()))
    return Pki(ca, other, ca.issue_server("server"), ca.issue_client("alice"), ca.issue_client("bob"),
               other.issue_client("mallory"), tokens, tokens_file)
