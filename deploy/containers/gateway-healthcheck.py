#!/opt/jvpn/bin/python3
"""The gateway image's health check: exit 0 when the node's /readyz answers 200.

A program without arguments, so that the check is the same one-word command in
the Dockerfile's HEALTHCHECK and in docker-compose.yml: Podman 4.3's
Docker-compatible API splits the words of an exec-form check at spaces
(`python3 -c "..."` arrives as `python3 -c import`).
"""

import sys
import urllib.error
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:9100/readyz"

try:
    with urllib.request.urlopen(URL, timeout=2) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except (OSError, urllib.error.URLError) as exc:
    print(f"{URL}: {exc}")
    sys.exit(1)
