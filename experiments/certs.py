"""Test certificates for a SuperLink and key pairs for SuperNode authentication.

``python -m fedsim.experiments.certs DIR [--host NAME_OR_IP ...] [--supernodes N]`` writes:

- ``ca.crt``, ``ca.key``: a self-signed certificate authority (give ``ca.crt`` to every
  SuperNode and to the machine that runs ``flwr run``; keep ``ca.key`` private).
- ``server.pem``, ``server.key``: the SuperLink's certificate, signed by that CA, valid for
  ``localhost``, ``127.0.0.1``, ``::1`` and every ``--host``.
- ``supernode-<i>``, ``supernode-<i>.pub``: one OpenSSH EC P-384 key pair per SuperNode,
  the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read.

These are for trying deployment and for tests. In production use certificates from your
organisation's CA; the key pairs are fine as they are, but create them on each SuperNode's
own machine so the private key never travels.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsim.errors import FedsimError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


def make_certificates(out: Path, hosts: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write a CA and a SuperLink certificate for loopback and ``hosts`` into ``out``.

    Parameters
    ----------
    out
        Folder to write into; created if missing. Existing files are never replaced.
    hosts
        Extra DNS names or IP addresses the SuperLink is reached at.

    Returns
    -------
    dict[str, Path]
        Paths by role: ``ca``, ``ca-key``, ``cert``, ``key``.

    """
    paths = {
        "ca": out / CA_CERT,
        "ca-key": out / CA_KEY,
        "cert": out / SERVER_CERT,
        "key": out / SERVER_KEY,
    }
    _refuse_existing(paths.values())
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim test CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim SuperLink")])
    cert = (
        _builder(subject, ca_name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(paths["ca"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca-key"], _pem_private(ca_key), private=True)
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["key"], _pem_private(key), private=True)
    return paths


def make_supernode_keys(out: Path, count: int, *, start: int = 0) -> list[tuple[Path, Path]]:
    """Write ``count`` SuperNode key pairs ``supernode-<i>`` / ``supernode-<i>.pub``.

    Returns
    -------
    list[tuple[Path, Path]]
        ``(private key, public key)`` per SuperNode, in order.

    """
    pairs = [
        (out / f"supernode-{i}", out / f"supernode-{i}.pub") for i in range(start, start + count)
    ]
    _refuse_existing([p for pair in pairs for p in pair])
    out.mkdir(parents=True, exist_ok=True)
    for private_path, public_path in pairs:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(private_path, private, private=True)
        _write(public_path, public + b"\n")
    return pairs


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # a little slack for machines whose clocks disagree by a few minutes
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys((*LOOPBACK, *hosts)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _refuse_existing(paths) -> None:
    for path in paths:
        if path.exists():
            raise FedsimError(f"{path} already exists; remove it or write into another folder")


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def write_all(out: Path, *, hosts: tuple[str, ...], supernodes: int, tls: bool) -> list[Path]:
    """Certificates (where ``tls``) and ``supernodes`` key pairs; all or nothing.

    Every path is checked before anything is written, so a refusal leaves nothing behind.
    """
    if supernodes < 0:
        raise FedsimError(f"--supernodes must be 0 or more, got {supernodes}")
    keys = [out / f"supernode-{i}{ext}" for i in range(supernodes) for ext in ("", ".pub")]
    certs = [out / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)] if tls else []
    _refuse_existing([*certs, *keys])
    written: list[Path] = list(make_certificates(out, hosts).values()) if tls else []
    for pair in make_supernode_keys(out, supernodes):
        written += pair
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsim.experiments.certs DIR``: print what was written, one path a line."""
    parser = argparse.ArgumentParser(prog="python -m fedsim.experiments.certs", description=__doc__)
    parser.add_argument("dir", type=Path, help="folder to write the files into")
    parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="a DNS name or IP address the SuperLink is reached at (repeatable)",
    )
    parser.add_argument(
        "--supernodes", type=int, default=0, metavar="N", help="also write N SuperNode key pairs"
    )
    parser.add_argument("--no-tls", action="store_true", help="write only the SuperNode key pairs")
    args = parser.parse_args(argv)
    try:
        written = write_all(
            args.dir, hosts=tuple(args.hosts), supernodes=args.supernodes, tls=not args.no_tls
        )
    except FedsimError as exc:
        print(f"certs: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
