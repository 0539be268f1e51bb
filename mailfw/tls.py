"""
Server TLS settings from C{[tls]}, used by STARTTLS.  (Implicit TLS on an
C{ssl:} listener takes its key and certificate from the endpoint
description itself.)

With no C{[tls]} section mailfw makes a self-signed certificate for its
hostname in C{DATA_DIR/tls/} on first start, as Debian's Postfix does with
its "snakeoil" certificate: opportunistic STARTTLS between MTAs encrypts
without verifying, and submission clients can be told to trust it.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger

from mailfw.config import ConfigError, ServerConfig

__all__ = ["makeSelfSigned", "selfSignedCertificate", "serverTLSOptions"]

log = Logger()

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def serverTLSOptions(config: ServerConfig) -> CertificateOptions:
    """
    Load the configured certificate chain and key, or the self-signed pair.

    @raise ConfigError: if the files cannot be read or do not match.
    """
    certPath, keyPath = config.certificate, config.privateKey
    if certPath is None or keyPath is None:
        certPath = config.dataDir / "tls" / "selfsigned-cert.pem"
        keyPath = config.dataDir / "tls" / "selfsigned-key.pem"
        if not certPath.exists() or not keyPath.exists():
            makeSelfSigned(config.hostname, certPath, keyPath)
            log.warn(
                "no [tls] configured: made a self-signed certificate for {hostname} in {path}",
                hostname=config.hostname,
                path=str(certPath),
            )
        else:
            try:
                return _load(certPath, keyPath)
            except ConfigError as e:
                # Our own pair, broken (a disk error or a crash before an
                # older mailfw had written it out): nobody else relies on
                # it, so make a new one rather than refuse to start.
                makeSelfSigned(config.hostname, certPath, keyPath)
                log.warn(
                    "remade the self-signed certificate in {path}: {problem}", path=str(certPath), problem=e
                )
    return _load(certPath, keyPath)


def _load(certPath: Path, keyPath: Path) -> CertificateOptions:
    """
    The options for the chain in C{certPath} and the key in C{keyPath}.

    @raise ConfigError: if the files cannot be read or do not match.
    """
    try:
        chain = _PEM_CERT.findall(certPath.read_bytes())
        keyPEM = keyPath.read_bytes()
    except OSError as e:
        raise ConfigError(f"[tls] cannot read {e.filename}: {e.strerror}") from None
    if not chain:
        raise ConfigError(f"[tls] certificate: no PEM certificate in {certPath}")
    try:
        certs = [x509.load_pem_x509_certificate(pem) for pem in chain]
        key = serialization.load_pem_private_key(keyPEM, password=None)
        # pyOpenSSL deprecates its own X509/PKey wrappers in favour of
        # cryptography's objects, which Twisted passes through unchanged
        # (its annotations still name the wrappers).
        options = CertificateOptions(
            privateKey=cast(Any, key),
            certificate=cast(Any, certs[0]),
            extraCertChain=cast(Any, certs[1:]),
        )
        options.getContext()  # checks that the key matches the certificate
    except Exception as e:
        raise ConfigError(f"[tls] unusable certificate or key ({certPath}): {e}") from None
    return options


def selfSignedCertificate(hostname: str, days: int = 3650) -> tuple[Any, Any]:
    """
    A new P-256 key and a self-signed certificate for C{hostname} (as
    C{cryptography} objects).
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def makeSelfSigned(hostname: str, certPath: Path, keyPath: Path) -> None:
    """
    Write a new self-signed certificate for C{hostname}, valid ten years.
    The key file is readable by its owner only.
    """
    key, cert = selfSignedCertificate(hostname)
    certPath.parent.mkdir(parents=True, exist_ok=True)
    keyBytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _writeDurably(keyPath, keyBytes, 0o600)
    _writeDurably(certPath, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _writeDurably(path: Path, data: bytes, mode: int) -> None:
    """
    Replace C{path} with C{data} so that a crash or a disk error leaves the
    old file or the whole new one, never an empty one: write a temporary
    file, flush it to the disk, rename it over C{path}, flush the directory.
    """
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
