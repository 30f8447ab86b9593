"""Settings: built-in defaults, then the settings file, then OPENMICROVM_* environment variables.

The settings file is TOML, found at --config, $OPENMICROVM_CONFIG, <data dir>/settings.toml, or
else the system-wide /etc/openmicrovm/openmicrovm.toml (the first of these that is given or exists).
Every key is documented in the README; the environment variable for a key is OPENMICROVM_<KEY>
in upper case (nested quota keys: OPENMICROVM_QUOTA_<NAME>).
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# The settings file of a server run as a system service (deploy/openmicrovm.service), read when
# no other is given or found, so that the service and every local user's CLI (which has no
# --config and its own home) agree on the data dir and the artifact roots. Tests point
# $OPENMICROVM_SYSTEM_CONFIG elsewhere, as they cannot write /etc.
SYSTEM_CONFIG_FILE = Path("/etc/openmicrovm/openmicrovm.toml")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "openmicrovm"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "openmicrovm"


@dataclass(frozen=True)
class AccessKey:
    access_key_id: str
    secret_access_key: str
    account_id: str


@dataclass(frozen=True)
class Quotas:
    """Per account and region, as spec §7; every one can be raised or lowered."""

    images: int = 100
    versions_per_image: int = 50
    # Sum of the memory baselines of non-terminated MicroVMs (AWS: 400 GB in most regions).
    microvm_memory_mib: int = 400 * 1024
    concurrent_builds: int = 5


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 4599
    data_dir: Path = field(default_factory=default_data_dir)
    # Where state lives: empty for SQLite in the data dir (openmicrovm.db), or
    # postgresql://user:password@host:port/database for a PostgreSQL server several hosts share.
    database_url: str = ""
    # Connections to PostgreSQL kept per server, and how long to wait for one.
    database_pool_size: int = 8
    database_connect_timeout_seconds: float = 5.0
    # Many hosts (see "From one host to many" in the README). The secret replicas and agents
    # prove to each other on every agent connection; empty on a one-host server. At least 32 bytes.
    cluster_secret: str = ""
    # How long an agent's lease lasts without a heartbeat: past it the host counts as lost and its
    # MicroVMs are TERMINATED; the agent itself stops its sandboxes before then (fencing).
    host_lease_seconds: float = 10.0
    # Where image version outputs go so that any host can run any version: s3://bucket/prefix
    # (empty: they stay on the host that built them). Credentials and region come from the usual
    # AWS settings (environment, ~/.aws); snapshot_store_endpoint_url names a non-AWS S3 server.
    snapshot_store_url: str = ""
    snapshot_store_endpoint_url: str = ""
    # Shared, rebuildable artefacts (the Debian base root filesystem, buildah layers).
    cache_dir: Path = field(default_factory=default_cache_dir)
    # buildah's storage driver for build layers: "overlay" or "vfs" (empty: overlay where a probe
    # shows it works here, else vfs).
    buildah_driver: str = ""
    # The Debian mirror the base root filesystem is bootstrapped from (empty: the one this host's
    # apt uses, else deb.debian.org).
    debian_mirror: str = ""
    # A second port serving the API and the endpoints over TLS with a local CA (0: none).
    # `openmicrovm tls init` makes the CA; clients trust <data dir>/tls/ca.pem.
    tls_port: int = 0
    # "auto" picks gvisor when runsc is installed, else process.
    driver: str = "auto"
    default_region: str = "us-east-1"
    # The account every request maps to while no access keys are configured.
    default_account: str = "000000000000"
    access_keys: tuple[AccessKey, ...] = ()
    quotas: Quotas = field(default_factory=Quotas)
    # How long a clientToken is remembered (AWS leaves it undocumented; replays were seen at 5 min).
    client_token_ttl_seconds: int = 24 * 3600
    # Lower bound of idlePolicy.maxIdleDurationSeconds. The API model says 60; tests lower it to
    # exercise idle suspension in seconds. Not for production use.
    min_idle_seconds: int = 60
    # Memory kept free for the host: a MicroVM is refused (InsufficientCapacityException) when
    # restoring it would leave less than this. 0: 5 % of RAM, at least 256 MiB.
    host_memory_reserve_mib: int = 0
    # A suspended MicroVM is frozen with its memory at once (resume in milliseconds), and its memory
    # is written to disk and freed this many seconds later (0: at once). gvisor driver only.
    suspend_to_disk_after_seconds: float = 20.0
    # gVisor's platform: "ptrace" (the default: lowest idle cost and latency) or "systrap" (much
    # faster for syscall-heavy apps, but each running sandbox spins ~2 % of a CPU). Empty: ptrace.
    # Env: OPENMICROVM_GVISOR_PLATFORM, or OPENMICROVM_RUNSC_PLATFORM.
    gvisor_platform: str = ""
    # The runsc binary new sandboxes run under (a path, or a name on PATH). Empty: the newest that
    # works here (Debian 13's in the cache dir, else the system's). gvisor driver only.
    runsc: str = ""
    # Restored, frozen sandboxes kept ready per recently run snapshot, so RunMicrovm does not wait
    # for a restore (0: none). gvisor driver only.
    restore_pool_size: int = 1
    # How long one "minute" of an auth token's expirationInMinutes lasts. 60, except in tests that
    # need to watch a token expire. Not for production use.
    auth_token_minute_seconds: float = 60.0
    # Largest request body the API accepts.
    max_request_bytes: int = 1024 * 1024
    # Largest code artifact zip the console may upload (POST /_openmicrovm/artifacts).
    max_upload_bytes: int = 64 * 1024 * 1024
    # Bounds on what an artifact may unpack to (zip bombs).
    max_artifact_bytes: int = 2 * 1024 * 1024 * 1024
    max_artifact_files: int = 100_000
    # How long the Dockerfile part of a build may run before it is stopped and fails.
    max_dockerfile_build_seconds: float = 3600.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_keep_files: int = 3
    # CloudWatch Logs shipping: how often it looks for new lines, the longest wait after failures,
    # the largest batch (events, bytes; the service's own limits cap them) and a call's timeout.
    cloudwatch_interval_seconds: float = 1.0
    cloudwatch_max_backoff_seconds: float = 60.0
    cloudwatch_batch_events: int = 10_000
    cloudwatch_batch_bytes: int = 1_048_576
    cloudwatch_timeout_seconds: float = 15.0
    # Host names the API answers to besides localhost, 127.0.0.1, [::1] and `host` (any port).
    # Every other Host is refused, so a web page cannot reach the API by DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    # Origins (`scheme://host[:port]`) whose browser requests the API accepts; a request with any
    # other Origin header is refused, so a web page cannot drive the API cross-site.
    allowed_origins: tuple[str, ...] = ()
    # Directories a `file://` code artifact may come from (empty: <data dir>/artifacts, where the
    # CLI puts its zips). Env: colon-separated.
    artifact_file_roots: tuple[Path, ...] = ()
    # Networks (CIDR) that MicroVMs and builds may reach although they are private or shared
    # address space (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7 are denied by default).
    egress_allow_networks: tuple[str, ...] = ()
    # Where builds and MicroVM uplinks take their addresses (a /30 each): private IPv4 networks
    # that no route of the host overlaps.
    build_subnet: str = "10.213.0.0/16"
    sandbox_subnet: str = "10.214.0.0/16"
    # More IPv4 networks (CIDR) builds and MicroVMs may not reach, whatever egress_allow_networks
    # opens; microvm_egress_deny holds for MicroVMs only.
    build_egress_deny: tuple[str, ...] = ()
    microvm_egress_deny: tuple[str, ...] = ()

    @property
    def signature_required(self) -> bool:
        return bool(self.access_keys)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'openmicrovm.db'}"

    @property
    def effective_artifact_file_roots(self) -> tuple[Path, ...]:
        """Where file:// artifacts may come from: artifact_file_roots, else the CLI's artifact dir."""
        return self.artifact_file_roots or (self.data_dir / "artifacts",)


_SCALARS = {f.name: f for f in fields(Settings) if f.name not in ("access_keys", "quotas")}
# List settings given as one environment string: how its items are separated (default ",").
_LIST_SEPARATORS = {"artifact_file_roots": ":"}
# Settings also read from a second variable, documented before the setting had its own name.
_ENV_ALIASES = {"gvisor_platform": "OPENMICROVM_RUNSC_PLATFORM"}
# The item type of each list setting.
_LIST_ITEMS: dict[str, type] = {"artifact_file_roots": Path}


def _coerce_list(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(_LIST_SEPARATORS.get(name, ","))]
    elif isinstance(value, (list, tuple)):
        items = [str(item).strip() for item in value]
    else:
        raise ValueError(f"setting {name} must be a list of strings, got {value!r}")
    if _LIST_ITEMS.get(name) is Path:
        return tuple(Path(os.path.expanduser(item)) for item in items if item)
    return tuple(item for item in items if item)


def _coerce(name: str, value: Any, like: Any) -> Any:
    if isinstance(like, tuple):
        return _coerce_list(name, value)
    if isinstance(like, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(like, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {name} must be an integer, got {value!r}") from None
    if isinstance(like, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {name} must be a number, got {value!r}") from None
    if isinstance(like, Path):
        return Path(os.path.expanduser(str(value)))
    return str(value)


def _apply(settings: Settings, values: dict[str, Any], origin: str) -> Settings:
    changes: dict[str, Any] = {}
    quota_changes: dict[str, Any] = {}
    for key, value in values.items():
        if key == "quotas":
            if not isinstance(value, dict):
                raise ValueError(f"{origin}: [quotas] must be a table")
            quota_changes.update(value)
        elif key == "access_keys":
            keys = []
            for entry in value:
                try:
                    keys.append(
                        AccessKey(
                            str(entry["access_key_id"]),
                            str(entry["secret_access_key"]),
                            str(entry["account_id"]),
                        )
                    )
                except (KeyError, TypeError):
                    raise ValueError(
                        f"{origin}: each [[access_keys]] needs access_key_id, secret_access_key and account_id"
                    ) from None
            changes["access_keys"] = tuple(keys)
        elif key in _SCALARS:
            changes[key] = _coerce(key, value, getattr(settings, key))
        else:
            raise ValueError(f"{origin}: unknown setting {key!r}")
    if quota_changes:
        known = {f.name for f in fields(Quotas)}
        unknown = set(quota_changes) - known
        if unknown:
            raise ValueError(f"{origin}: unknown quota {sorted(unknown)[0]!r}; known: {sorted(known)}")
        changes["quotas"] = replace(
            settings.quotas,
            **{k: _coerce(k, v, getattr(settings.quotas, k)) for k, v in quota_changes.items()},
        )
    return replace(settings, **changes)


def _from_environment(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    quotas: dict[str, Any] = {}
    for name in _SCALARS:
        env_name = f"OPENMICROVM_{name.upper()}"
        if env_name in environ:
            values[name] = environ[env_name]
        elif _ENV_ALIASES.get(name) in environ:
            values[name] = environ[_ENV_ALIASES[name]]
    for quota in fields(Quotas):
        env_name = f"OPENMICROVM_QUOTA_{quota.name.upper()}"
        if env_name in environ:
            quotas[quota.name] = environ[env_name]
    if quotas:
        values["quotas"] = quotas
    return values


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Defaults < settings file < environment < explicit overrides (command-line flags)."""
    env = dict(os.environ if environ is None else environ)
    from_env = _from_environment(env)
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = Settings()
    # The data dir decides where the default settings file lives, so resolve it first.
    data_dir_hint = explicit.get("data_dir") or from_env.get("data_dir")
    if data_dir_hint is not None:
        settings = replace(settings, data_dir=Path(os.path.expanduser(str(data_dir_hint))))
    path = config_file or (Path(env["OPENMICROVM_CONFIG"]) if env.get("OPENMICROVM_CONFIG") else None)
    if path is None:
        path = _found_settings_file(settings.data_dir, env)
    if path is not None:
        try:
            with open(path, "rb") as handle:
                settings = _apply(settings, tomllib.load(handle), str(path))
        except FileNotFoundError:
            raise ValueError(f"settings file {path} does not exist") from None
        except PermissionError:
            raise ValueError(
                f"settings file {path} cannot be read by this user: make it readable to the users "
                f"who run openmicrovm (chmod 0644 {path}), or set OPENMICROVM_CONFIG to a settings "
                "file this user can read"
            ) from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"settings file {path} is not valid TOML: {error}") from None
        except OSError as error:
            raise ValueError(f"cannot read the settings file {path}: {error.strerror}") from None
    settings = _apply(settings, from_env, "environment")
    return _apply(settings, explicit, "command line")


def system_config_file(environ: dict[str, str] | None = None) -> Path:
    """The system-wide settings file: $OPENMICROVM_SYSTEM_CONFIG, else SYSTEM_CONFIG_FILE."""
    override = (os.environ if environ is None else environ).get("OPENMICROVM_SYSTEM_CONFIG")
    return Path(override) if override else SYSTEM_CONFIG_FILE


def _found_settings_file(data_dir: Path, environ: dict[str, str]) -> Path | None:
    """<data dir>/settings.toml when it exists, else the system-wide file when it exists."""
    own = data_dir / "settings.toml"
    try:
        if own.exists():
            return own
    except PermissionError:
        # A data dir this user may not enter (a system service's, 0700): what it holds is the
        # service's business; the system-wide file is the one meant for everyone.
        pass
    system = system_config_file(environ)
    try:
        return system if system.exists() else None
    except PermissionError:
        # /etc/openmicrovm itself closed to this user: reading the file says so, with what to do.
        return system


def configured_cache_dir(log: logging.Logger) -> Path:
    """The settings' cache dir, for an installer run beside the server (runsc, the console's
    assets); the default one, with a warning, when the settings cannot be read: a broken
    settings file must not stop an install."""
    try:
        return load_settings().cache_dir
    except Exception as error:
        log.warning("cannot read the settings (%s); using the default cache dir", error)
        return default_cache_dir()
