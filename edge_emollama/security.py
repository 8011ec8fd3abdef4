"""ZeroMQ CURVE with an allow-list ("ironhouse"): the keys, and applying them to sockets (docs/security.md).

A key folder (``edge-emollama keys DIR --client NAME``) holds pyzmq certificates:

    DIR/server.key, DIR/server.key_secret          the runtime's key pair (the secret stays on the robot)
    DIR/clients/NAME.key, NAME.key_secret          one pair per client; the public keys are the allow-list

- Server side (PUB, control, the bound end of a TCP stage link): ``curve_server`` with the runtime's key
  pair and a ZAP domain; one ``ThreadAuthenticator`` per zmq Context (started once, :func:`serve_curve`)
  answers for every domain. PUB and control accept the keys in ``DIR/clients/``; stage links accept only the
  runtime's own key (``DIR/server.key``: the other stage processes hold the same folder), so a subscriber's
  key never reaches raw frames.
- Client side: the server's public key and the client's key pair (:func:`connect_curve`).
- The allow-list is read when a socket is first served: adding or removing a client needs a restart.

Core module: no runtime imports (the client uses it too).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import SecurityConfig
from .errors import ConfigError, OutputError
from .lazy import require

__all__ = ["ServerKeys", "ClientKeys", "Security", "security_of", "write_keys", "load_server_keys",
           "load_client_keys", "serve_curve", "connect_curve", "stop_authenticator", "ALLOW_CLIENTS",
           "ALLOW_STAGES"]

log = logging.getLogger(__name__)
SERVER = "server"
CLIENTS = "clients"
ALLOW_CLIENTS = "clients"    # PUB and control: the keys in DIR/clients/
ALLOW_STAGES = "stages"      # stage links: the runtime's own key, DIR/server.key
SECRET_MODE = 0o600
_WARNED: set = set()     # key folders already warned about (an empty allow-list)


@dataclass(frozen=True)
class ServerKeys:
    """The runtime's key pair and where its allow-lists are."""
    folder: Path
    public: bytes
    secret: bytes

    @property
    def clients(self) -> Path:
        return self.folder / CLIENTS

    def as_client(self) -> "ClientKeys":
        """The runtime's own stages connect to each other's links with the server key pair."""
        return ClientKeys(server_public=self.public, public=self.public, secret=self.secret)


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs: the server's public key and its own key pair."""
    server_public: bytes
    public: bytes
    secret: bytes


@dataclass(frozen=True)
class Security:
    """The bind policy: CURVE with these keys, or none (then only loopback, unless ``insecure``)."""
    keys: ServerKeys | None = None
    insecure: bool = False

    @classmethod
    def from_config(cls, config: SecurityConfig) -> "Security":
        keys = load_server_keys(config.curve) if config.curve else None
        return cls(keys=keys, insecure=bool(config.insecure))


def security_of(value: "Security | SecurityConfig | None") -> Security:
    """A :class:`Security` from itself, from ``runtime.security`` (keys loaded), or None (loopback only)."""
    if value is None:
        return Security()
    if isinstance(value, Security):
        return value
    if isinstance(value, SecurityConfig):
        return Security.from_config(value)
    raise TypeError(f"security must be a Security, a SecurityConfig or None, not {type(value).__name__}")


# --- writing keys -------------------------------------------------------------------------------------------
def write_keys(folder: str | os.PathLike, clients: list[str] | tuple = ()) -> list[Path]:
    """Write the server key pair (unless it exists) and one pair per client name; the written files.

    Never overwrites a secret: an existing ``server.key_secret`` is kept (new clients can be added to a
    folder), an existing client is an OutputError naming the file and the fix. Secrets are mode 0600."""
    folder = Path(folder)
    for name in clients:
        _check_name(name)
    existing = [folder / CLIENTS / f"{name}.key_secret" for name in clients
                if (folder / CLIENTS / f"{name}.key_secret").exists()]
    if existing or (not clients and (folder / f"{SERVER}.key_secret").exists()):
        found = existing or [folder / f"{SERVER}.key_secret"]
        raise OutputError(f"{', '.join(map(str, found))} already exists: secrets are never overwritten; remove "
                          "the file to replace that key (its clients or servers must then get the new one), or "
                          "choose another --client NAME or folder")
    written = []
    if not (folder / f"{SERVER}.key_secret").exists():
        written += _create_pair(folder, SERVER)
    for name in clients:
        written += _create_pair(folder / CLIENTS, name)
    return written


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
        raise ConfigError(f"client name {name!r}: use a plain file name such as laptop or ros-bridge")


def _create_pair(folder: Path, name: str) -> list[Path]:
    auth = require("zmq.auth")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # the secret file exists with mode 0600 before pyzmq writes it (never readable by others), and O_EXCL
        # refuses a file that appeared since the check
        os.close(os.open(folder / f"{name}.key_secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE))
        public, secret = auth.create_certificates(folder, name)
        os.chmod(secret, SECRET_MODE)
    except OSError as exc:
        raise OutputError(f"cannot write keys to {folder}: {exc} (choose a folder you can write)") from exc
    return [Path(public), Path(secret)]


# --- loading keys -------------------------------------------------------------------------------------------
def _load(path: Path, what: str, fix: str) -> tuple[bytes, bytes | None]:
    auth = require("zmq.auth")
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found: {fix}")
    try:
        return auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is not a ZeroMQ certificate ({exc}): {fix}") from exc


def load_server_keys(folder: str | os.PathLike) -> ServerKeys:
    """The runtime's key pair from ``folder`` (server.key_secret); ConfigError naming the file and the fix."""
    folder = Path(folder)
    fix = f"create the keys with: edge-emollama keys {folder} --client NAME"
    public, secret = _load(folder / f"{SERVER}.key_secret", "the server's secret key", fix)
    if not secret:
        raise ConfigError(f"{folder / (SERVER + '.key_secret')} holds no secret key: {fix}")
    if folder.resolve() not in _WARNED and not any((folder / CLIENTS).glob("*.key")):
        _WARNED.add(folder.resolve())
        log.warning("no client keys in %s: every subscriber and control client will be refused (add one with: "
                    "edge-emollama keys %s --client NAME)", folder / CLIENTS, folder)
    return ServerKeys(folder=folder, public=public, secret=secret)


def load_client_keys(folder: str | os.PathLike, name: str) -> ClientKeys:
    """A client's keys from ``folder``: ``server.key`` (public) and ``clients/NAME.key_secret``."""
    folder = Path(folder)
    _check_name(name)
    server_public, _ = _load(folder / f"{SERVER}.key", "the server's public key",
                             "copy server.key from the runtime's key folder (edge-emollama keys DIR)")
    public, secret = _load(folder / CLIENTS / f"{name}.key_secret", f"client {name!r}'s secret key",
                           f"create it on the runtime with: edge-emollama keys {folder} --client {name}, and copy "
                           "clients/NAME.key_secret here")
    if not secret:
        raise ConfigError(f"{folder / CLIENTS / (name + '.key_secret')} holds no secret key: use the .key_secret "
                          "file that edge-emollama keys wrote")
    return ClientKeys(server_public=server_public, public=public, secret=secret)


# --- sockets ------------------------------------------------------------------------------------------------
class _Authenticators:
    """One started ThreadAuthenticator per zmq Context, and the ZAP domains configured on it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_context: dict = {}    # context -> (authenticator, {domain})

    def ensure(self, context, domain: str, allow_folder: Path) -> None:
        with self._lock:
            if context not in self._by_context:
                thread = require("zmq.auth.thread")
                authenticator = thread.ThreadAuthenticator(context, log=logging.getLogger("zmq.auth"))
                authenticator.start()
                self._by_context[context] = (authenticator, set())
            authenticator, domains = self._by_context[context]
            if domain not in domains:
                authenticator.configure_curve(domain=domain, location=str(allow_folder))
                domains.add(domain)

    def stop(self, context) -> None:
        with self._lock:
            entry = self._by_context.pop(context, None)
        if entry is not None:
            entry[0].stop()


_AUTHENTICATORS = _Authenticators()


def _domain(allow: str, folder: Path) -> tuple[str, Path]:
    """The ZAP domain of an allow-list and the folder of its public keys (one domain per key folder)."""
    if allow not in (ALLOW_CLIENTS, ALLOW_STAGES):
        raise ValueError(f"allow must be {ALLOW_CLIENTS!r} or {ALLOW_STAGES!r}, not {allow!r}")
    location = folder / CLIENTS if allow == ALLOW_CLIENTS else folder
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return f"emollama.{allow}.{digest}", location


def serve_curve(socket, context, keys: ServerKeys, allow: str = ALLOW_CLIENTS) -> None:
    """Make ``socket`` (before bind) a CURVE server accepting only the ``allow`` list's public keys."""
    zmq = require("zmq")
    domain, location = _domain(allow, keys.folder)
    _AUTHENTICATORS.ensure(context, domain, location)
    if hasattr(zmq, "ZAP_ENFORCE_DOMAIN"):
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)   # no ZAP handler: refuse, never accept everyone
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    socket.setsockopt(zmq.ZAP_DOMAIN, domain.encode())


def connect_curve(socket, keys: ClientKeys) -> None:
    """Make ``socket`` (before connect) a CURVE client of the server whose public key ``keys`` names."""
    zmq = require("zmq")
    socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def stop_authenticator(context) -> None:
    """Stop the authenticator of ``context`` (before terminating it); nothing when it has none."""
    _AUTHENTICATORS.stop(context)
