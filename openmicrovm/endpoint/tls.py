"""Optional TLS with a local certificate authority, so that `https://<endpoint>` works as on AWS.

`openmicrovm tls init` makes a CA (kept in <data dir>/tls, key mode 0600) and a server certificate
it signs for `localhost`, 127.0.0.1 and `*.lambda-microvm.<region>.localhost` in every region the
settings name. Clients trust the CA (curl --cacert, boto3 verify=, or the system store); the
server serves TLS on `tls_port` beside the plain port. ALPN offers `h2` beside `http/1.1` to
clients that name an endpoint (SNI); the API is offered `http/1.1` only.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from openmicrovm.endpoint.hostnames import endpoint_hostname
from openmicrovm.private_files import write_private_file

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
CA_YEARS = 10
SERVER_DAYS = 397  # the longest validity browsers accept for a server certificate


def tls_dir(data_dir: Path) -> Path:
    return data_dir / "tls"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # 0600 from creation, fsynced, renamed into place: a crash never leaves a truncated key.
    write_private_file(path, data)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def ensure_ca(directory: Path) -> Path:
    """The CA certificate's path, making the CA on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / CA_CERT
    if cert_path.exists() and (directory / CA_KEY).exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "openmicrovm local CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "openmicrovm"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(directory / CA_KEY, key)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path


def all_regions(default_region: str) -> list[str]:
    """Every region an endpoint may name: those botocore knows for Lambda, and the default."""
    import boto3

    known = boto3.session.Session().get_available_regions("lambda")
    return sorted({*known, default_region})


def server_names(regions: list[str]) -> list[str]:
    return ["localhost", *(f"*.lambda-microvm.{region}.localhost" for region in regions)]


def issue_server_certificate(directory: Path, regions: list[str]) -> tuple[Path, Path]:
    """A server certificate signed by the CA for the API and every region's endpoints."""
    ca_cert = x509.load_pem_x509_certificate(ensure_ca(directory).read_bytes())
    ca_key = _load_key(directory / CA_KEY)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in server_names(regions)]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openmicrovm")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / SERVER_KEY, key)
    (directory / SERVER_CERT).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return directory / SERVER_CERT, directory / SERVER_KEY


def server_context(directory: Path, regions: list[str]) -> ssl.SSLContext:
    """The TLS context of the server, issuing (or renewing) its certificate as needed."""
    cert, key = directory / SERVER_CERT, directory / SERVER_KEY
    if not cert.exists() or not key.exists() or _needs_renewal(cert, regions):
        cert, key = issue_server_certificate(directory, regions)
    context = _context(cert, key, ["http/1.1"])
    endpoints = _context(cert, key, ["h2", "http/1.1"])

    def choose(connection: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        # HTTP/2 is offered to MicroVM endpoints only: the API (aiohttp) speaks HTTP/1.1, and a
        # client told h2 would have no way back. OpenSSL reads the ALPN choice from the context
        # the connection has after this callback.
        if endpoint_hostname(name) is not None:
            connection.context = endpoints

    context.sni_callback = choose
    return context


def _context(cert: Path, key: Path, protocols: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(protocols)
    return context


def _needs_renewal(cert_path: Path, regions: list[str]) -> bool:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    expires = certificate.not_valid_after_utc
    if expires - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=30):
        return True
    present = set(
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
    )
    return not set(server_names(regions)) <= present
