"""The coordinator's gateway: nginx at the coordinator's public address.

Flower 1.41's SuperLink serves the Fleet API (nodes), the Control API (register SuperNodes,
submit and stop runs) and the Runtime API (ServerApp tasks) on one port, and open-source Flower
authenticates the Control API with a no-op plugin: whoever reaches that port can run code on
the coordinator. So the SuperLink listens on 127.0.0.1 only and this standard reverse proxy
holds the public address: it forwards the SuperNode's twelve Fleet POSTs and a health check,
nothing else, and refuses a node-authentication header set it has seen before (Flower signs only
a timestamp and accepts it for about 305 s: ``gateway_files/fleet_guard.lua``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from fedtune.common.errors import FedtuneError
from fedtune.platform.config import CoordinatorConfig

FILES = Path(__file__).parent / "gateway_files"
GUARD = FILES / "fleet_guard.lua"
MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
HEALTH_PATH = "/healthz"
# Logins seen in the last 330 s: about 200 bytes each, so 64 MiB holds some 300,000 (a node
# sends one to three requests a second); when full, the oldest are evicted, and logged.
REPLAY_CACHE_MB = 64
# A client address may send this many seconds' worth of requests at once before the rate
# applies (gateway.requests_per_second).
BURST_SECONDS = 10
# The SuperNode's requests (flwr/supernode/fleet_http_client.py, superlink/routers/fleet).
FLEET_PATHS = tuple(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)


class GatewayError(FedtuneError, RuntimeError):
    """The gateway cannot be configured or started."""


def gateway_folder(config: CoordinatorConfig) -> Path:
    return config.coordinator.state_dir / "gateway"


def key_id(public_key: bytes) -> str:
    """The id the gateway logs for a node's key: the first 16 hex digits of the SHA-1 of the
    PEM bytes Flower sends (fleet_guard.lua computes the same)."""
    return hashlib.sha1(public_key, usedforsecurity=False).hexdigest()[:16]


def render_config(config: CoordinatorConfig) -> str:
    """nginx.conf for ``config``'s gateway."""
    folder = gateway_folder(config)
    host = config.coordinator.host
    listen_host = f"[{host}]" if ":" in host else host
    template = Environment(
        loader=FileSystemLoader(FILES), undefined=StrictUndefined, keep_trailing_newline=True
    ).get_template("nginx.conf.j2")
    return template.render(
        modules_dir=config.gateway.modules_dir,
        folder=folder,
        replay_cache_mb=REPLAY_CACHE_MB,
        max_body_mb=config.gateway.max_body_mb,
        requests_per_second=config.gateway.requests_per_second,
        burst=config.gateway.requests_per_second * BURST_SECONDS,
        ca_certificate=config.tls.ca_certificate,
        certificate=config.tls.certificate,
        private_key=config.tls.private_key,
        superlink_address=config.superlink_address,
        superlink_name="localhost",  # in the certificate (tls.SUPERLINK_HOSTS); nginx
        # verifies DNS names only, never IP addresses
        listen=f"{listen_host}:{config.coordinator.port}",
        fleet_paths=FLEET_PATHS,
        guard=GUARD,
    )


def write_config(config: CoordinatorConfig) -> Path:
    """Write the gateway's nginx.conf (mode 0600) and check it with ``nginx -t``."""
    nginx = _nginx(config)
    for module in MODULES:
        if not (config.gateway.modules_dir / module).is_file():
            raise GatewayError(
                f"gateway.modules_dir: {config.gateway.modules_dir / module} is missing "
                "(Debian: apt install libnginx-mod-http-lua)"
            )
    folder = gateway_folder(config)
    (folder / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "nginx.conf"
    path.write_text(render_config(config), encoding="utf-8")
    path.chmod(0o600)
    checked = subprocess.run(
        [*_command(nginx, folder), "-t"], capture_output=True, text=True, timeout=60
    )
    if checked.returncode != 0:
        lines = [line for line in checked.stderr.splitlines() if "[emerg]" in line]
        raise GatewayError(
            f"nginx refused {path}: " + " ".join(lines or checked.stderr.splitlines()[-2:])
        )
    return path


def gateway_command(config: CoordinatorConfig) -> list[str]:
    """nginx in the foreground with the gateway's configuration (write_config first)."""
    return _command(_nginx(config), gateway_folder(config))


def wait_until_healthy(config: CoordinatorConfig, *, timeout_s: float = 30) -> None:
    """Wait until the gateway answers its health check over TLS; GatewayError after
    ``timeout_s``."""
    url = f"https://{config.public_address}{HEALTH_PATH}"
    context = ssl.create_default_context(cafile=str(config.tls.ca_certificate))
    context.check_hostname = False  # the address may be 127.0.0.1 for a named certificate
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            if time.monotonic() > deadline:
                raise GatewayError(f"the gateway does not answer at {url}: {exc}") from None
        time.sleep(0.3)


def _nginx(config: CoordinatorConfig) -> str:
    # Debian installs it in /usr/sbin, which an ordinary account's PATH lacks.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    found = shutil.which(config.gateway.nginx, path=path)
    if found is None:
        raise GatewayError(
            f"gateway.nginx: {config.gateway.nginx!r} is not installed "
            "(Debian: apt install nginx libnginx-mod-http-lua)"
        )
    return found


def _command(nginx: str, folder: Path) -> list[str]:
    return [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", "stderr"]
