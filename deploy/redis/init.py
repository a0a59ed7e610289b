"""Redis for the compose stack: its TLS certificates and its ACL users.

Run once before redis-server starts (the `redis-init` service of
docker-compose.yml, in the gateway image, which has `cryptography`):

    python init.py OUT_DIR

It writes, into OUT_DIR:
- ``ca.crt``: a private CA (the gateways verify Redis against it:
  ``store_tls_ca_file``), and ``redis.crt`` / ``redis.key``: Redis's server
  certificate for the names in ``JVPN_REDIS_TLS_NAMES`` (default ``redis``),
  made once and kept across restarts;
- ``users.acl``: ``users.acl`` beside this file with the comment lines
  dropped (redis-server reads none) and each ``@<WHO>_SHA256@`` mark replaced
  by the SHA-256 of ``$JVPN_REDIS_<WHO>_PASSWORD`` (written every start, so a
  changed password takes effect on the next start).

The key and the ACL file are readable only by their owner: ``JVPN_REDIS_UID``
(default 999, the redis user of the official image) when run as root.
tests/cluster/test_deploy_configs.py runs this file and loads its output into
a real redis-server.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = re.compile(r"@([A-Z]+)_SHA256@")
VALID_DAYS = 3650


def render_acl(template: str, env: dict[str, str]) -> str:
    """The ACL file redis-server loads: no comments, every password mark replaced."""
    lines = [line for line in template.splitlines(True) if line.strip() and not line.startswith("#")]
    text = "".join(lines)

    def sha(m: re.Match[str]) -> str:
        name = f"JVPN_REDIS_{m.group(1)}_PASSWORD"
        password = env.get(name, "")
        if len(password) < 16:
            raise SystemExit(f"redis init: {name} must be set, at least 16 characters")
        return hashlib.sha256(password.encode()).hexdigest()

    return MARK.sub(sha, text)


def make_tls(out: Path, names: list[str]) -> None:
    """A CA and a server certificate for ``names`` (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
              signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            alt: list[x509.GeneralName] = []
            for n in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    srv_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("Jumping VPN Redis CA", ca_key, "Jumping VPN Redis CA", ca_key, True)
    srv = build(names[0], srv_key, "Jumping VPN Redis CA", ca_key, False)
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "redis.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    _private(out / "redis.key", srv_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        uid = int(os.environ.get("JVPN_REDIS_UID", "999"))
        os.chown(path, uid, uid)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in os.environ.get("JVPN_REDIS_TLS_NAMES", "redis").split(",") if n]
    if not (out / "redis.key").exists():
        make_tls(out, names)
        print(f"redis init: CA and server certificate for {', '.join(names)} in {out}")
    acl = render_acl((HERE / "users.acl").read_text(), dict(os.environ))
    _private(out / "users.acl", acl.encode())
    print(f"redis init: ACL users written to {out / 'users.acl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
