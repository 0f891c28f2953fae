"""A throwaway grid certificate authority for tests: a CA, a host certificate and
users' proxies, as a site's ``/etc/grid-security`` and ``voms-proxy-init`` make them.

```
TestCertificateAuthority(directory)            directory/ (0700)
    ca_dir        certificates/<hash>.0         the CA certificate under OpenSSL's
                                                subject hash, as X509_CERT_DIR holds it
    host_cert()   hostcert.pem, hostkey.pem     the server's certificate (127.0.0.1)
    issue_proxy() <name>.pem                    proxy, its key, the user certificate:
                                                what X509_USER_PROXY names
```

Every private key is written to a 0600 file under ``directory`` and nowhere else
(never a log, never a command line). Keys are EC P-256: grid CAs issue RSA, but
generating four RSA keys would cost a loaded 2-core machine a second, and neither
TLS nor PanDA looks at the key type.
"""

from __future__ import annotations

import datetime
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from idds_fat.errors import IddsFatError
from idds_fat.workdir import private_dir, write_private

#: The proxyCertInfo extension of RFC 3820 (id-pe-proxyCertInfo), and its value for
#: a proxy that inherits all its issuer's rights (id-ppl-inheritAll), DER-encoded:
#: SEQUENCE { SEQUENCE { OBJECT IDENTIFIER 1.3.6.1.5.5.7.21.1 } }.
_PROXY_CERT_INFO = "1.3.6.1.5.5.7.1.14"
_INHERIT_ALL_DER = bytes.fromhex("300c300a06082b06010505071501")


class CertificateError(IddsFatError):
    """A test certificate could not be made (``openssl`` missing or failing)."""


@dataclass(frozen=True)
class HostCertificate:
    """The paths of a host's certificate and its private key (0600)."""

    cert: Path
    key: Path


class TestCertificateAuthority:
    """A CA of its own, made on construction, that signs a host certificate and users.

    Args:
        directory: where certificates and keys go (created 0700).
        name: the CA's common name.

    Raises:
        CertificateError: ``openssl`` (for the subject hash of ``ca_dir``) failed.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, directory: Path, name: str = "idds-fat test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        self.directory = private_dir(Path(directory))
        self._key = _new_key()
        self.subject = x509.Name(
            [
                x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "test"),
                x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "idds-fat"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = _now()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self.subject)
            .issuer_name(self.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_dir = self.directory / "certificates"
        self.ca_dir.mkdir(mode=0o755, exist_ok=True)
        pem = self.ca_dir / "ca.pem"
        pem.write_bytes(_pem(self._cert))
        # OpenSSL finds a CA in a directory by the hash of its subject (c_rehash).
        (self.ca_dir / f"{_subject_hash(pem)}.0").write_bytes(_pem(self._cert))

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM)."""
        return self.ca_dir / "ca.pem"

    def host_cert(self, host: str = "127.0.0.1") -> HostCertificate:
        """Sign a server certificate for ``host`` (an IP address or a DNS name; also
        ``localhost``); write it and its key (0600) as ``hostcert.pem`` and ``hostkey.pem``."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = _new_key()
        try:
            names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(host))]
        except ValueError:
            names = [x509.DNSName(host)]
        names.append(x509.DNSName("localhost"))
        subject = x509.Name(
            [*list(self.subject)[:2], x509.NameAttribute(NameOID.COMMON_NAME, f"host/{host}")]
        )
        cert = (
            self._signed(subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        paths = HostCertificate(self.directory / "hostcert.pem", self.directory / "hostkey.pem")
        paths.cert.write_bytes(_pem(cert))
        write_private(paths.key, _pem_key(key))
        return paths

    def user_subject(self, common_name: str) -> str:
        """The DN (OpenSSL's ``/DC=../CN=..`` form) of a user this CA signs."""
        return "/DC=test/DC=idds-fat/CN=" + common_name

    def issue_proxy(
        self, name: str, common_name: str, *, lifetime: float = 12 * 3600
    ) -> tuple[Path, str]:
        """Sign a user certificate for ``common_name`` and an RFC 3820 proxy of it, as
        ``voms-proxy-init`` (without VOMS attributes) makes one; write proxy, proxy
        key and user certificate, in that order, to ``<name>.pem`` (0600).

        Returns:
            the file's path, and the proxy's subject DN (the user's DN and
            ``/CN=<number>``, which is what the server sees).
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        if not name.replace("-", "").replace("_", "").isalnum():
            raise CertificateError(f"not a file name for a proxy: {name!r}")
        user_key, proxy_key = _new_key(), _new_key()
        user_subject = x509.Name(
            [*list(self.subject)[:2], x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        )
        user = (
            self._signed(user_subject, user_key.public_key(), lifetime=lifetime + 3600)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(self._key, hashes.SHA256())
        )
        serial = secrets.randbelow(2**31 - 1) + 1
        proxy_subject = x509.Name(
            [*user_subject, x509.NameAttribute(NameOID.COMMON_NAME, str(serial))]
        )
        now = _now()
        proxy = (
            x509.CertificateBuilder()
            .subject_name(proxy_subject)
            .issuer_name(user_subject)
            .public_key(proxy_key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.UnrecognizedExtension(
                    x509.ObjectIdentifier(_PROXY_CERT_INFO), _INHERIT_ALL_DER
                ),
                critical=True,
            )
            .sign(user_key, hashes.SHA256())
        )
        path = self.directory / f"{name}.pem"
        write_private(path, _pem(proxy) + _pem_key(proxy_key) + _pem(user))
        dn = self.user_subject(common_name) + f"/CN={serial}"
        return path, dn

    def _signed(self, subject, public_key, lifetime: float = 2 * 86400):  # noqa: ANN001, ANN202
        from cryptography import x509

        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key():  # noqa: ANN202 - cryptography's key type, imported lazily
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:  # cryptography comes with the test extra
        raise CertificateError(
            "the test CA needs the cryptography package: install idds-fat[test]"
        ) from None
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(ca: bool):  # noqa: ANN202
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(cert) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)


def _pem_key(key) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _subject_hash(pem: Path) -> str:
    """OpenSSL's subject hash of a certificate (only the public certificate's path
    goes on the command line)."""
    try:
        done = subprocess.run(
            ["openssl", "x509", "-noout", "-subject_hash", "-in", str(pem)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError as exc:
        raise CertificateError(f"cannot run openssl for the CA's subject hash: {exc}") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise CertificateError(f"openssl x509 -subject_hash failed: {done.stderr.strip()}")
    return done.stdout.strip()
