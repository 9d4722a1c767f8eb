"""Sidecar settings: defaults, then a TOML file, then ``SPECROUTE_*`` environment variables.

Nested groups use ``__`` in environment names (``SPECROUTE_LIMITS__MAX_NEW_TOKENS=64``);
list values are JSON (``SPECROUTE_MODEL_ROOTS='["/models"]'``).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from router.bundle import default_bundle_dir, specroute_home
from router.capture import MAX_THREADS, AutoDistillSettings, CaptureSettings
from router.errors import validation_lines
from router.policy.base import MAX_DRAFT_LENGTH

logger = logging.getLogger(__name__)

CONFIG_FILE_ENV = "SPECROUTE_CONFIG"
ENV_PREFIX = "SPECROUTE_"
#: ``SPECROUTE_*`` variables that are not sidecar settings: the config file, the cache home
#: (``router.bundle``), the command-line client's (``router.serve_cli``,
#: ``router.channel``) and the benchmarks' vLLM interpreter. Any other ``SPECROUTE_*``
#: name no setting reads is logged at start (``unknown_env_lines``).
OTHER_ENV_NAMES = frozenset(
    ENV_PREFIX + name
    for name in (
        "CONFIG",
        "HOME",
        "ADDRESS",
        "TIMEOUT",
        "CA_FILE",
        "TLS_SERVER_NAME",
        "VLLM_PYTHON",
        "LOG_FORMAT",  # router.logs: every command's, read by typer
    )
)


#: The largest value gRPC's channel options take (a C int).
MAX_C_INT = 2**31 - 1
# gRPC takes times as C ints of milliseconds: at most about 24 days.
MAX_OPTION_S = MAX_C_INT // 1000


class Limits(BaseModel):
    """Per-request and capacity limits; requests beyond them are refused, never queued."""

    model_config = ConfigDict(extra="forbid")  # a misspelt limit is an error, not ignored

    max_prompt_tokens: int = Field(default=1024, gt=0)
    max_new_tokens: int = Field(default=512, gt=0)
    # gRPC takes it as a C int: at most 2 GiB - 1.
    max_request_bytes: int = Field(default=1 << 20, gt=0, le=MAX_C_INT)
    # Generations run one at a time per worker on the shared target.
    generation_workers: int = Field(default=1, gt=0, le=MAX_THREADS)
    # Generations waiting for a worker; one more is RESOURCE_EXHAUSTED.
    generation_queue_size: int = Field(default=8, ge=0)
    # Outstanding routed requests kept for Report (oldest forgotten first).
    pending_reports: int = Field(default=100_000, gt=0)
    # Seconds of full-information scoring of other drafters per greedy generation.
    counterfactual_budget_s: float = Field(default=0.5, ge=0.0)
    # Route calls that arrive while a batch is being decided form the next batch (one
    # tokenizer and one classifier call each), at most this many.
    route_batch_max: int = Field(default=256, gt=0)
    # Where Route and Generate count prompts' tokens and classify them (router.
    # prompt_reader). "child_process" (default): in a child with its own GIL (in-process
    # while it starts or restarts), for throughput: on 2 vCPUs Route at concurrency 64
    # ran at 0.60 of an echo servicer against 0.25 in-process. "in_process": in the call,
    # on the event loop, with no process to start or watch; a lone call is answered about
    # 0.1-0.2 ms sooner (benchmarks/load/HISTORY.md).
    prompt_reader: Literal["child_process", "in_process"] = "child_process"
    # Off (0) by default. For hosts where waking an idle vCPU is slow (a KVM guest with
    # guest_halt_poll_ns 0): after a lone batch, the child_process reader's child
    # busy-waits this long for the next one, yielding the CPU, instead of sleeping. There,
    # 2 ms measured +0.2 of echo at concurrency 64 and -0.2 ms p50 at concurrency 1
    # (router.route_process); it costs up to this much CPU per lone call.
    prompt_reader_spin_ms: float = Field(default=0.0, ge=0.0, le=100.0)
    # Drafters registered through the admin API (built-in ones not counted); one more is
    # RESOURCE_EXHAUSTED. Every Route prices each drafter's arms.
    max_registered_drafters: int = Field(default=64, ge=0)
    # A model drafter is loaded only if its weights (at the target's precision) and this
    # much beside them fit in the memory left: the host's available memory, each memory
    # cgroup's limit less its use, or a CUDA device's free memory. Else its registration
    # is RESOURCE_EXHAUSTED, and a stored one is not served at start (kept).
    drafter_memory_headroom_mib: int = Field(default=512, ge=0)


class LossGuardSettings(BaseModel):
    """Shorter drafts, then none, once a request's own acceptance and costs say the
    router's k does not pay for it (``drafters/guard.py``); ``confidence``: the upper
    quantile of its acceptance that must still prefer the shorter draft."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    confidence: float = Field(default=0.95, ge=0.5, lt=1.0)


class StructuredOutputSettings(BaseModel):
    """Structured output for every request (``drafters/grammar.py``), as vLLM's
    ``--structured-outputs-config`` (a request may ask for either alone).
    ``disable_any_whitespace``: JSON without optional whitespace between its tokens;
    ``disable_additional_properties``: a schema's objects with ``properties`` and no
    ``additionalProperties`` take no other key. A weak model can otherwise spend its whole
    budget on whitespace, or on keys nobody asked for."""

    model_config = ConfigDict(extra="forbid")

    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False


class PredictionSettings(BaseModel):
    """Predicted outputs (OpenAI's ``prediction``; ``drafters/prediction.py``): a request
    that sends the text it expects back drafts from it, up to ``draft_length`` tokens a
    step (fewer after the target rejects its drafts; the routed drafter drafts where the
    prediction has nothing)."""

    model_config = ConfigDict(extra="forbid")

    draft_length: int = Field(default=16, ge=1, le=MAX_DRAFT_LENGTH)


class GrpcSettings(BaseModel):
    """How the gRPC port keeps its connections (HTTP/2 keepalive pings, connection age)."""

    model_config = ConfigDict(extra="forbid")

    # The server pings a connection after this long without a frame, and closes it when
    # no answer comes within keepalive_timeout_s: a client host gone without closing
    # (power lost, a partition) is noticed, and its calls are cancelled.
    keepalive_time_s: float = Field(default=60.0, gt=0, le=MAX_OPTION_S)
    keepalive_timeout_s: float = Field(default=20.0, gt=0, le=MAX_OPTION_S)
    # Clients' keepalive pings are accepted this often, with calls in flight or none.
    # gRPC's own default accepts one per 5 minutes, and none on a connection without a
    # call: a client that pings more often (a grpc-go client with keepalive set, a proxy)
    # gets GOAWAY "too_many_pings", and the calls it has in flight fail.
    min_client_ping_interval_s: float = Field(default=5.0, gt=0, le=MAX_OPTION_S)
    # A connection older than this is sent GOAWAY (its calls finish, within
    # max_connection_age_grace_s), and its client connects again: behind a TCP load
    # balancer (a Kubernetes Service) clients then spread over replicas added since.
    # None: never.
    max_connection_age_s: float | None = Field(default=None, gt=0, le=MAX_OPTION_S)
    max_connection_age_grace_s: float | None = Field(default=None, gt=0, le=MAX_OPTION_S)


class TlsSettings(BaseModel):
    """Optional server TLS: both files or neither."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    key_file: Path | None = None
    # How often the HTTP and metrics ports look for renewed files (gRPC: at each new
    # connection); router.certificates.
    reload_interval_s: float = Field(default=30.0, gt=0)

    @field_validator("cert_file", "key_file")
    @classmethod
    def _home_expanded(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsSettings:
        # One alone served plaintext while the operator believed TLS was on.
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file are set together or not at all")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


class PoolingSettings(BaseModel):
    """Replicas that pool what they learn through Redis (router.pooling, docs/pooling.md).

    Off by default. On, every entry is HMAC-signed with ``secret``: a sidecar with pooling
    on and no secret refuses to start rather than accept or write unsigned entries.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # redis://[:password@]host:port/db, or rediss:// for TLS; a secret (it may hold one).
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # rediss://: a CA bundle besides the system's (an existing file: a missing one only
    # failed each connection later).
    tls_ca_file: FilePath | None = None
    secret: SecretStr | None = None  # the fleet's shared HMAC key
    # redis_url is one node of a Redis Cluster (cluster mode enabled: ElastiCache's
    # configuration endpoint, Memorystore Cluster): each stream is sent to the node that
    # holds its slot (database 0 only, as a cluster has).
    cluster: bool = False
    outcome_stream: str = Field(default="specroute:outcomes", min_length=1)
    registry_stream: str = Field(default="specroute:drafters", min_length=1)
    # Entries kept per stream (XADD MAXLEN ~): what a new or restarted replica replays.
    retention: int = Field(default=100_000, gt=0)
    # Shown in logs and entries; each start adds its own suffix (a new identity for dedupe).
    replica_id: str = ""
    # Outcomes kept while Redis is unreachable; beyond it the oldest are dropped (counted).
    buffer_size: int = Field(default=10_000, gt=0)
    reconnect_max_s: float = Field(default=5.0, gt=0)
    # How long a start waits for Redis to replay history before serving without it.
    replay_timeout_s: float = Field(default=10.0, ge=0)

    @field_validator("tls_ca_file", mode="before")
    @classmethod
    def _ca_home_expanded(cls, value: Any) -> Any:
        # Before the file's existence is checked: "~/ca.pem" was refused as missing.
        return Path(value).expanduser() if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _ca_only_for_tls(self) -> PoolingSettings:
        # A CA with a plain redis:// URL was ignored without a word: TLS was not on.
        url = self.redis_url.get_secret_value()
        if self.enabled:
            check_redis_url(url)
        if self.tls_ca_file is not None and not url.startswith("rediss://"):
            raise ValueError("tls_ca_file is for a rediss:// (TLS) redis_url; this one is not")
        if self.cluster and urlsplit(url).path.strip("/") not in ("", "0"):
            raise ValueError(
                "a Redis Cluster has database 0 only: give redis_url without a database, "
                "or /0, with cluster = true"
            )
        return self


def list_from_text(value: Any, separator: str, items: str) -> Any:
    """A list setting given as text (an environment variable): a JSON list, or ``items``
    separated by ``separator``; any other value as it is. Text that opens a JSON list and
    is not one is a validation error naming the setting."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as error:
            raise ValueError(f"not a JSON list of {items}: {text!r} ({error})") from None
    return [part.strip() for part in text.split(separator) if part.strip()]


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC targets and URLs spell it: an IPv6 address in brackets
    (``[::1]:50051``; gRPC read "::1:50051" as a misformatted name)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_redis_url(url: str) -> None:
    """ValueError naming ``redis_url`` for a URL redis-py would refuse once the models had
    loaded (exit 1, the setting unnamed), or would read as another database (a database
    that is not a number was database 0 without a word). Its password is never told."""
    from redis.connection import parse_url

    try:
        parse_url(url)
    except ValueError as error:
        raise ValueError(f"redis_url: {error}") from None
    parts = urlsplit(url)
    database = parts.path.strip("/") if parts.scheme != "unix" else ""
    if database and not database.isdigit():
        raise ValueError(f"redis_url: the database must be a number, not {database!r}")


class Settings(BaseSettings):
    """Everything ``specroute serve`` needs; ``--print-config`` shows the merged result."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    # None: the built-in default world, unless target_dir and classifier_dir are both set.
    world_dir: Path | None = None
    world_scale: str = "default"
    target_dir: Path | None = None  # None: the world's target
    classifier_dir: Path | None = None  # None: the world's classifier (trained if missing)
    # Built-in model drafters by name, besides the world's (e.g. real Qwen2.5 checkpoints).
    drafter_dirs: dict[str, Path] = Field(default_factory=dict)
    # The world dir is always a root. SPECROUTE_MODEL_ROOTS: a JSON list, or paths
    # separated by os.pathsep (":"), as PATH is.
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    state_dir: Path = Field(default_factory=lambda: specroute_home() / "state")
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    # None (-1 in a file or the environment, as on the command line): off.
    http_port: int | None = Field(default=8080, ge=0, le=65535)  # no HTTP fronts
    metrics_port: int | None = Field(default=9090, ge=0, le=65535)  # no metrics server
    admin_token: SecretStr | None = None
    data_token: SecretStr | None = None  # when set, Route/Report/Generate need it too
    tls: TlsSettings = Field(default_factory=lambda: TlsSettings())
    grpc: GrpcSettings = Field(default_factory=lambda: GrpcSettings())
    capture: CaptureSettings = Field(default_factory=lambda: CaptureSettings())
    auto_distill: AutoDistillSettings = Field(default_factory=lambda: AutoDistillSettings())
    limits: Limits = Field(default_factory=lambda: Limits())
    loss_guard: LossGuardSettings = Field(default_factory=lambda: LossGuardSettings())
    prediction: PredictionSettings = Field(default_factory=lambda: PredictionSettings())
    structured_output: StructuredOutputSettings = Field(
        default_factory=lambda: StructuredOutputSettings()
    )
    pooling: PoolingSettings = Field(default_factory=lambda: PoolingSettings())
    # A fleet file (router.fleet.config, docs/fleet.md): generation runs on the vLLM
    # replicas it lists, one speculative configuration each; None: the in-process engine.
    fleet_file: Path | None = None
    # The model ids the OpenAI front answers to and /v1/models lists, as vLLM's
    # --served-model-name (a client configured for vLLM keeps its model name); empty: the
    # target directory's name (in fleet mode, the replicas' model).
    # SPECROUTE_SERVED_MODEL_NAMES: a JSON list, or names separated by commas.
    served_model_names: Annotated[list[Annotated[str, Field(min_length=1)]], NoDecode] = Field(
        default_factory=list
    )
    policy: str = "thompson"
    policy_config: dict[str, Any] = Field(default_factory=dict)
    # The bundle's (world's) model drafters at start; false leaves them out. The n-gram and
    # no-drafter arms always serve, and so do the drafter_dirs.
    bundle_drafters: bool = True
    snapshot_interval_s: float = Field(default=30.0, gt=0)
    grace_s: float = Field(default=5.0, ge=0)
    device: str | None = None  # None: CUDA when present, else CPU
    # Precision of the target and model drafters: "auto" is bfloat16 on GPUs (Ampere on)
    # and CPUs with native bf16 (/proc/cpuinfo flags avx512_bf16 or amx_bf16; aarch64
    # bf16), else float32 (drafters.loader.resolve_dtype).
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # torch intra-op threads (0: torch's default). Tiny models decode fastest on one thread,
    # and generation and counterfactual scoring run side by side: more threads than cores
    # made a tiny forward 10x slower here. Raise it for a real checkpoint on CPU.
    torch_threads: int = Field(default=1, ge=0, le=MAX_THREADS)
    # Seeds numpy and scikit-learn, which take 0 to 2**32 - 1.
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @model_validator(mode="before")
    @classmethod
    def _renamed_settings(cls, data: Any) -> Any:
        # builtin_drafters = false also dropped ngram and none; its successor does not, so
        # an old file is refused with what to write instead of silently meaning more.
        in_env = f"{cls.model_config.get('env_prefix', '')}BUILTIN_DRAFTERS" in os.environ
        if in_env or (isinstance(data, dict) and "builtin_drafters" in data):
            raise ValueError(
                "builtin_drafters was renamed: bundle_drafters = false leaves out the "
                "bundle's model drafters (ngram and none always serve)"
            )
        return data

    @field_validator("http_port", "metrics_port", mode="before")
    @classmethod
    def _minus_one_is_off(cls, value: Any) -> Any:
        # TOML has no null: only --http-port -1 could turn the fronts off, not a config
        # file or a Kubernetes env block (refused as "greater than or equal to 0").
        return None if value in (-1, "-1") else value

    @field_validator("host")
    @classmethod
    def _host_unbracketed(cls, value: str) -> str:
        # "[::1]", as a URL spells it, is the address ::1 (the port check could not resolve
        # it); an empty host was listened on as ":50051".
        host = value.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ValueError("must be an address or name to listen on (127.0.0.1, 0.0.0.0, ::)")
        return host

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        # Refused with the settings (status 2), not after the models have loaded.
        from router.policy.registry import POLICIES

        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; known: {sorted(POLICIES)}")
        return value

    @model_validator(mode="after")
    def _auto_distill_can_run(self) -> Settings:
        # A cluster keeps at most samples_per_cluster samples: a larger min_samples started
        # and never distilled anything.
        auto, kept = self.auto_distill, self.capture.samples_per_cluster
        if auto.enabled and auto.min_samples > kept:
            raise ValueError(
                f"auto_distill.min_samples ({auto.min_samples}) is more than a cluster keeps "
                f"(capture.samples_per_cluster, {kept}): no cluster would ever be distilled"
            )
        return self

    @model_validator(mode="after")
    def _policy_builds(self) -> Settings:
        # A policy_config the policy refuses: with the settings, before any model loads.
        from router.policy.registry import policy_config_problem

        problem = policy_config_problem(self.policy, self.policy_config)
        if problem is not None:
            raise ValueError(f"policy_config for {self.policy!r}: {problem}")
        return self

    @field_validator("world_dir", "target_dir", "classifier_dir", "state_dir", "fleet_file")
    @classmethod
    def _home_expanded(cls, value: Path | None) -> Path | None:
        # "~/models/qwen" as target_dir was read as a Hugging Face repo id and refused
        # with a misleading message (drafter_dirs and model_roots were expanded).
        return value.expanduser() if value is not None else None

    @field_validator("drafter_dirs")
    @classmethod
    def _drafter_dirs_expanded(cls, value: dict[str, Path]) -> dict[str, Path]:
        # A name registration would refuse, or one of the model-free arms ("none" was
        # loaded, then silently replaced by plain decoding), is refused with the settings.
        if not value:
            return value
        from router.drafter_pool import NAME_PATTERN
        from router.policy.base import NONE_DRAFTER

        for name in value:
            if name in (NONE_DRAFTER, "ngram") or not NAME_PATTERN.fullmatch(name):
                raise ValueError(
                    f"drafter name {name!r}: letters, digits and _.- (at most 64), not "
                    f"{NONE_DRAFTER!r} or 'ngram'"
                )
        return {name: directory.expanduser() for name, directory in value.items()}

    @field_validator("admin_token", "data_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty SPECROUTE_DATA_TOKEN (a variable that did not render) left the data
        # calls open without a word: unset it to mean "no token". Whitespace around it (a
        # Kubernetes secret's trailing newline) is dropped: no client could send it, so
        # every call was refused.
        if value is None:
            return value
        token = value.get_secret_value().strip()
        if not token:
            raise ValueError("is empty or blank; leave it unset for no token")
        return SecretStr(token)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        # A typo ("gpu") ended in torch's traceback after the settings were accepted.
        if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device: cpu, cuda, cuda:N, mps or xpu")
        return value

    @field_validator("served_model_names", mode="before")
    @classmethod
    def _names_from_text(cls, value: Any) -> Any:
        # "qwen" was refused as 'error parsing value ... Expecting value: line 1 column 1'.
        return list_from_text(value, ",", "names")

    @field_validator("model_roots", mode="before")
    @classmethod
    def _roots_from_text(cls, value: Any) -> Any:
        return list_from_text(value, os.pathsep, "paths")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: explicit arguments (CLI flags), env, then the TOML file.
        toml_path = os.environ.get(CONFIG_FILE_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    def uses_world(self) -> bool:
        """Whether the models come from a world (a model bundle): the configured one, or
        the built-in default unless ``target_dir`` and ``classifier_dir`` are both set."""
        explicit = self.target_dir is not None and self.classifier_dir is not None
        return self.world_dir is not None or not explicit

    def world_path(self) -> Path:
        """The configured world directory, or the built-in default world's."""
        if self.world_dir is not None:
            return Path(self.world_dir).expanduser()
        return default_bundle_dir(self.world_scale)

    def printable(self) -> dict[str, Any]:
        """The merged settings as JSON-ready data, secrets masked."""
        data = self.model_dump(mode="json")
        for key in ("admin_token", "data_token"):
            if data.get(key):
                data[key] = "**********"
        return data


class TlsFilesError(ValueError):
    """The TLS certificate and key do not read, parse or belong together: a setting that
    is wrong, refused like a typo (exit status 2)."""


class SettingsLoadError(ValueError):
    """The settings cannot be read (a missing or malformed TOML file, a value of the wrong
    type in the file or in a ``SPECROUTE_*`` variable); the message says where."""


def setting_env_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> Iterator[str]:
    """Every environment name a setting is read from: ``SPECROUTE_PORT``, and for a group
    of settings each of its own (``SPECROUTE_LIMITS__MAX_NEW_TOKENS``)."""
    for name, field in model.model_fields.items():
        env_name = f"{prefix}{name.upper()}"
        yield env_name
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            yield from setting_env_names(group, f"{env_name}__")


def unknown_env_lines(environ: Mapping[str, str]) -> list[str]:
    """One line per ``SPECROUTE_*`` variable in ``environ`` that no setting reads, with the
    setting meant where one is close: pydantic-settings skips such a name without a word,
    so a misspelt ``SPECROUTE_DATA_TOKN`` left the data calls open. A group's own names
    are checked by the group (``extra="forbid"``: ``SPECROUTE_LIMITS__BOGUS`` is an
    error); a variable that is yours (a replica's ``api_key_env``) can be ignored."""
    known = [*setting_env_names(), *OTHER_ENV_NAMES]
    groups = tuple(name + "__" for name in known)
    lines = []
    for variable in sorted(environ):
        name = variable.upper()  # settings are read from the environment case-insensitively
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(groups):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        meant = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{variable} is not a specroute setting and is ignored{meant}")
    return lines


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then ``config_file`` (TOML; without it, ``$SPECROUTE_CONFIG`` names it),
    then ``SPECROUTE_*`` env, then ``overrides``. ``SettingsLoadError`` when they cannot be
    read, a named file that does not exist included; a ``SPECROUTE_*`` variable no setting
    reads is a warning (``unknown_env_lines``)."""
    for line in unknown_env_lines(os.environ):
        logger.warning("%s", line)
    previous = os.environ.get(CONFIG_FILE_ENV)
    named = config_file if config_file is not None else (Path(previous) if previous else None)
    if named is not None and not Path(named).is_file():
        source = "" if config_file is not None else f" (${CONFIG_FILE_ENV})"
        problem = "is not a file" if Path(named).exists() else "does not exist"
        raise SettingsLoadError(f"config file {named}{source} {problem}")
    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = str(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        raise SettingsLoadError(validation_lines(error)) from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsLoadError(f"config file {named} is not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise SettingsLoadError(f"config file {named} is not UTF-8 text ({error.reason})") from None
    except SettingsError as error:  # e.g. a SPECROUTE_* map that is not JSON
        cause = f": {error.__cause__}" if error.__cause__ else ""
        raise SettingsLoadError(f"{error}{cause}") from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_FILE_ENV, None)
            else:
                os.environ[CONFIG_FILE_ENV] = previous
