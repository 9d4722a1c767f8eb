"""The fleet file: replicas, each with its URL, served model and speculative configuration.

TOML, refused as a whole on any error (``FleetConfigError``, one line)::

    request_timeout_s = 120          # no byte from a replica for this long: it failed
    [[replicas]]
    url = "http://10.0.0.1:8000"     # the vLLM server (its OpenAI API is under /v1)
    model = "Qwen/Qwen2.5-7B-Instruct"
    speculative = "none"             # "none", "ngram", or a drafter name of the registry
    [[replicas]]
    url = "http://10.0.0.2:8000"
    model = "Qwen/Qwen2.5-7B-Instruct"
    speculative = "code"
    k = 3                            # the replica's num_speculative_tokens

Replicas started with an API key (vLLM's ``--api-key`` or ``VLLM_API_KEY``) get it from
an environment variable of the sidecar that the fleet file names, never from the file
itself: ``api_key_env = "VLLM_API_KEY"`` for the whole fleet, or per replica. It is sent
as ``Authorization: Bearer <key>`` on every call to the replica. ``https://`` replicas are
verified against the system's CAs, or against ``tls_ca_file`` (a PEM bundle) when set; a
relative ``tls_ca_file`` is read from the fleet file's directory.

The policy's arms are the drafters the fleet offers, so one drafter runs at one k across
the fleet, and every replica serves the same model.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    ValidationError,
    field_validator,
    model_validator,
)

from router.policy.base import MAX_DRAFT_LENGTH, NONE_DRAFTER

NGRAM = "ngram"
DEFAULT_DRAFT_LENGTH = 3
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # an environment variable's name


class FleetConfigError(ValueError):
    """The fleet file cannot be served as written; the message is one line."""


def normalise_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing ``/`` or ``/v1``; anything
    else (another scheme, no host, a bad port, a query) is refused."""
    if "@" in url:
        # Credentials (and a URL that has any would be echoed in the errors below): the
        # URL labels the replica on the unauthenticated /metrics and in Route replies.
        raise ValueError(
            "a replica URL must not hold credentials (user:password@): they would show in "
            "metrics and replies; give the key with api_key_env"
        )
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s)://host[:port] URL")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{url!r} has a bad port: {exc}") from exc
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r} must not have a query or fragment")
    path = parts.path.rstrip("/").removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


class ReplicaSpec(BaseModel):
    """One vLLM server and the speculative configuration it was started with."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    url: str
    model: str = Field(min_length=1)
    speculative: str = Field(min_length=1)
    k: int | None = Field(default=None, ge=0, le=MAX_DRAFT_LENGTH)
    name: str = ""
    max_in_flight: int | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)
    api_key_env: str | None = Field(default=None, pattern=ENV_NAME)  # None: the fleet's

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return normalise_url(value)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """k defaults to 0 without speculation, else DEFAULT_DRAFT_LENGTH; the name to the
        URL (a malformed URL is left for its own validator to refuse)."""
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        if filled.get("k") is None:
            none = filled.get("speculative") == NONE_DRAFTER
            filled["k"] = 0 if none else DEFAULT_DRAFT_LENGTH
        if not filled.get("name") and isinstance(filled.get("url"), str):
            with contextlib.suppress(ValueError):
                filled["name"] = normalise_url(filled["url"])
        return filled

    @model_validator(mode="after")
    def _draft_length(self) -> ReplicaSpec:
        if self.speculative == NONE_DRAFTER and self.k:
            raise ValueError(f"{self.url}: speculative = 'none' runs with k = 0, got {self.k}")
        if self.speculative != NONE_DRAFTER and self.k == 0:
            raise ValueError(f"{self.url}: {self.speculative} needs k >= 1")
        return self

    @property
    def draft_length(self) -> int:
        return int(self.k or 0)


class FleetSpec(BaseModel):
    """The whole fleet file."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    replicas: list[ReplicaSpec] = Field(min_length=1)
    # A replica is probed this often (GET /health); a failed one is probed until it is back.
    health_interval_s: float = Field(default=2.0, gt=0)
    # vLLM's queue (vllm:num_requests_running / _waiting on /metrics) is read this often.
    metrics_interval_s: float = Field(default=1.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    # A serving replica's model and tokenizer are checked again this often, as before it
    # is brought back: one redeployed at its URL with another checkpoint is taken out.
    verify_interval_s: float = Field(default=60.0, gt=0)
    # A replica silent this long (no byte of its stream) has failed; per replica: timeout_s.
    request_timeout_s: float = Field(default=120.0, gt=0)
    # Requests in flight per replica (per replica: max_in_flight); a replica at its bound is
    # saturated, and a configuration whose replicas all are is passed over.
    max_in_flight: int = Field(default=8, gt=0)
    # A request that failed on this many replicas it reached is not retried on another: a
    # request that makes engines fail would otherwise take down one replica after another.
    max_replica_failures: int = Field(default=2, gt=0)
    # The environment variable holding the replicas' API key (per replica: api_key_env).
    api_key_env: str | None = Field(default=None, pattern=ENV_NAME)
    # https replicas are verified against this CA bundle (PEM) instead of the system's.
    tls_ca_file: FilePath | None = None
    # The file is read again this often while the sidecar serves, and a change applied
    # (router.fleet.reload); 0: read at start only.
    reload_interval_s: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> FleetSpec:
        names = [replica.name for replica in self.replicas]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"two replicas are named {duplicate!r}")
        urls = [replica.url for replica in self.replicas]
        shared = next((u for u in urls if urls.count(u) > 1), None)
        if shared is not None:
            # One vLLM server has one speculative configuration; two entries would count
            # its load twice and export one series of metrics for both.
            raise ValueError(f"two replicas have the URL {shared!r}")
        draft_lengths: dict[str, int] = {}
        for replica in self.replicas:
            known = draft_lengths.setdefault(replica.speculative, replica.draft_length)
            if known != replica.draft_length:
                raise ValueError(
                    f"{replica.speculative} runs at k = {known} and k = {replica.draft_length}: "
                    "one drafter runs at one k across the fleet (it is one arm of the policy)"
                )
        models = {replica.model for replica in self.replicas}
        if len(models) > 1:
            raise ValueError(f"every replica must serve the same model, got {sorted(models)}")
        return self

    @property
    def model(self) -> str:
        return self.replicas[0].model

    def drafters(self) -> list[str]:
        """The speculative configurations offered, by drafter name (``none`` included)."""
        return list(dict.fromkeys(replica.speculative for replica in self.replicas))

    def draft_length(self, drafter: str) -> int:
        return next(r.draft_length for r in self.replicas if r.speculative == drafter)

    @property
    def probe_timeout_s(self) -> float:
        """How long a health check (and each call of a replica's verification) waits."""
        return self.connect_timeout_s + 1.0


def replica_api_keys(
    fleet: FleetSpec, environ: Mapping[str, str] = os.environ, source: str = ""
) -> dict[str, str | None]:
    """Each replica's API key (None: it needs none), from the environment variable its
    ``api_key_env`` (or the fleet's) names; a variable that is not set or empty is a
    ``FleetConfigError`` naming it (the key itself is never in a message)."""
    keys: dict[str, str | None] = {}
    for replica in fleet.replicas:
        name = replica.api_key_env or fleet.api_key_env
        if name is not None and not environ.get(name):
            raise FleetConfigError(
                f"{source or 'fleet file'}: replica {replica.name}: api_key_env names {name}, "
                "which is not set in the sidecar's environment (it holds the key the replica "
                "was started with)"
            )
        keys[replica.name] = environ[name] if name is not None else None
    return keys


def replica_tls(fleet: FleetSpec, source: str = "") -> ssl.SSLContext | None:
    """The TLS context for ``https://`` replicas when ``tls_ca_file`` is set (None: the
    HTTP client's default, the system's CAs); a file that is not a CA bundle is a
    ``FleetConfigError``."""
    if fleet.tls_ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(fleet.tls_ca_file))
    except (ssl.SSLError, OSError) as error:
        raise FleetConfigError(
            f"{source or 'fleet file'}: tls_ca_file {fleet.tls_ca_file}: not a CA bundle "
            f"(PEM): {error}"
        ) from None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def parse_fleet(data: dict[str, Any], source: str = "fleet file") -> FleetSpec:
    try:
        return FleetSpec.model_validate(data)
    except ValidationError as error:
        raise FleetConfigError(f"{source}: {_one_line(error)}") from None


def load_fleet_file(path: Path) -> FleetSpec:
    """The fleet file at ``path``, validated (``FleetConfigError`` names the problem)."""
    return fleet_from_bytes(read_fleet_file(path), Path(path))


def read_fleet_file(path: Path) -> bytes:
    """The content of the fleet file at ``path`` (``FleetConfigError`` if unreadable)."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise FleetConfigError(f"fleet file {path}: {error.strerror or error}") from None


def fleet_from_bytes(content: bytes, path: Path) -> FleetSpec:
    """The fleet file ``path`` whose content is ``content``, validated."""
    try:
        data = tomllib.loads(content.decode())
    except UnicodeDecodeError as error:
        raise FleetConfigError(f"fleet file {path}: not UTF-8 text ({error.reason})") from None
    except tomllib.TOMLDecodeError as error:
        raise FleetConfigError(f"fleet file {path}: not TOML: {error}") from None
    return parse_fleet(relative_to_file(data, path.parent), f"fleet file {path}")


def relative_to_file(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``data`` with a relative ``tls_ca_file`` taken from ``directory`` (the fleet file's),
    not from the sidecar's working directory, so that a fleet file and its CA bundle can be
    kept together and moved together."""
    ca_file = data.get("tls_ca_file")
    if isinstance(ca_file, str) and ca_file and not Path(ca_file).expanduser().is_absolute():
        return {**data, "tls_ca_file": str(directory / ca_file)}
    return data


def check_fleet_drafters(fleet: FleetSpec, known: Collection[str], source: str = "") -> None:
    """Every configuration must name a drafter the sidecar knows (its arms and priors)."""
    for replica in fleet.replicas:
        if replica.speculative not in known:
            raise FleetConfigError(
                f"{source or 'fleet file'}: replica {replica.name}: unknown drafter "
                f"{replica.speculative!r}; known: {sorted(known)}"
            )


def known_drafters(settings: Any) -> set[str]:
    """The drafter names a sidecar with ``settings`` serves at start, read without loading
    a model: the bundle's (unless ``bundle_drafters`` is off), ``drafter_dirs``, ``ngram``,
    ``none`` and those registered at run time (``RegisterDrafter``, kept in the state
    directory, which a running sidecar may hold). Empty when the bundle or the state
    database cannot be read (serving will say why)."""
    from router.bundle import BundleNotFoundError, ModelBundle
    from router.store import StateStoreError, registered_names

    names = {NGRAM, NONE_DRAFTER, *settings.drafter_dirs}
    try:
        names |= set(registered_names(Path(settings.state_dir)))
        if settings.uses_world() and settings.bundle_drafters:
            names |= set(ModelBundle.load(settings.world_path()).drafter_dirs)
    except (BundleNotFoundError, FileNotFoundError, ValueError, StateStoreError):
        return set()
    return names


def check_fleet_settings(settings: Any) -> FleetSpec | None:
    """The fleet file of ``settings``, read and checked against the drafters it would
    serve (``FleetConfigError`` on any problem); None without a fleet file."""
    if settings.fleet_file is None:
        return None
    fleet = load_fleet_file(Path(settings.fleet_file))
    known = known_drafters(settings)
    if known:
        check_fleet_drafters(fleet, known, f"fleet file {settings.fleet_file}")
    replica_api_keys(fleet, source=f"fleet file {settings.fleet_file}")
    replica_tls(fleet, f"fleet file {settings.fleet_file}")
    return fleet
