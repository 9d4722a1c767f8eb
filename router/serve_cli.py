"""``specroute serve``, and CLI clients of a running sidecar: route, generate, drafters, policy.

Client commands talk gRPC to ``--address`` (``$SPECROUTE_ADDRESS``, default
127.0.0.1:50051), with TLS when ``$SPECROUTE_CA_FILE`` names the CA to trust; admin
commands send ``--token`` (``$SPECROUTE_ADMIN_TOKEN``), the others ``--token``
(``$SPECROUTE_DATA_TOKEN``, else the admin token) for a sidecar with a data token. Each
call waits at most ``--timeout`` seconds (``$SPECROUTE_TIMEOUT``; per command defaults).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from router.policy.base import MAX_DRAFT_LENGTH

DEFAULT_ADDRESS = "127.0.0.1:50051"


def address_option(value: str | None) -> str | None:
    """A typer callback: ``--address`` is host:port (``router.channel.checked_address``)."""
    from router.channel import checked_address

    try:
        return None if value is None else checked_address(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def token_option(value: str | None) -> str | None:
    """A typer callback: a bearer token a header can carry (``checked_token``)."""
    from router.channel import checked_token

    try:
        return checked_token(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


ADDRESS_OPTION = typer.Option(
    envvar="SPECROUTE_ADDRESS", callback=address_option, help="host:port."
)
TOKEN_OPTION = typer.Option(
    envvar="SPECROUTE_ADMIN_TOKEN", callback=token_option, help="Bearer token."
)
DATA_TOKEN_OPTION = typer.Option(
    envvar=["SPECROUTE_DATA_TOKEN", "SPECROUTE_ADMIN_TOKEN"],
    callback=token_option,
    help="Bearer token, when the sidecar has a data_token (the admin token is accepted too).",
)
TIMEOUT_OPTION = typer.Option(
    "--timeout",
    envvar="SPECROUTE_TIMEOUT",
    min=0.001,
    help="Seconds to wait for the sidecar's answer (a stuck sidecar is DEADLINE_EXCEEDED).",
)
# The wire's integer types (router.proto): a larger value failed in protobuf with a traceback.
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
JSON_OPTION = typer.Option("--json", help="The reply as JSON (for scripts), not a table.")
RAW_OPTION = typer.Option(
    "--raw", help="Send TEXT as is (already templated), not as a user message."
)


def _group(app: typer.Typer, name: str, help_text: str) -> typer.Typer:
    """The root app's sub-group ``name`` (another package may have created it), else a new one."""
    for group in app.registered_groups:
        if group.name == name and group.typer_instance is not None:
            return group.typer_instance
    created = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(created, name=name)
    return created


def _stub(address: str) -> Any:
    from router.channel import ClientTlsError, client_tls, sidecar_channel
    from router.pb import router_pb2_grpc

    try:
        tls = client_tls()
    except ClientTlsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    return router_pb2_grpc.RouterStub(sidecar_channel(address, tls))


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _print_message(message: Any) -> None:
    from google.protobuf.json_format import MessageToDict

    typer.echo(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def _call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a gRPC call; a refused call exits 1 with its status instead of a traceback."""
    import grpc

    try:
        return function(*args, **kwargs)
    except grpc.RpcError as error:
        typer.echo(f"error: {error.code().name}: {error.details()}", err=True)
        raise typer.Exit(1) from None


def _ask(address: str, method: str, request: Any, token: str | None, timeout: float) -> Any:
    """The sidecar's answer to ``method`` (a Router RPC's name), with the token, within
    ``timeout`` seconds; a refused call exits 1 (``_call``)."""
    call = getattr(_stub(address), method)
    return _call(call, request, metadata=_metadata(token), timeout=timeout)


def _port(value: int | None) -> int | None:
    return None if value is not None and value < 0 else value


def _ports_file(path: Path | None) -> Path | None:
    """``--ports-file`` checked before anything loads: it was written once serving, so a
    directory, or a folder that is not there, stopped a sidecar that had announced itself
    (a traceback, or an error naming a ``.tmp`` file never given)."""
    if path is not None and path.is_dir():
        raise typer.BadParameter(f"{path} is a directory, not a file")
    if path is not None and not path.parent.is_dir():
        raise typer.BadParameter(f"{path.parent} is not a directory")
    return path


def serve_command(
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
    world: Annotated[
        Path | None,
        typer.Option("--world", help="Model bundle directory (default: the built-in world)."),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on (127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="gRPC port (50051; 0: any).")] = None,
    # Range-checked here: they bypass the settings' validation (-1 is None there).
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port", min=-1, max=65535, help="TGI and OpenAI HTTP port (8080); -1: off."
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=-1, max=65535, help="Prometheus port (9090); -1: off."),
    ] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="Policy name (thompson).")] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Show settings, exit.")
    ] = False,
    ports_file: Annotated[
        Path | None,
        typer.Option(
            "--ports-file",
            callback=_ports_file,
            help="Once serving, write the ports as JSON here (for ports of 0).",
        ),
    ] = None,
    fleet: Annotated[
        Path | None, typer.Option("--fleet", help="Fleet file: generate on vLLM replicas.")
    ] = None,
) -> None:
    """Run the sidecar: gRPC Router, TGI- and OpenAI-compatible HTTP fronts, Prometheus
    metrics; with --fleet, generation runs on the vLLM replicas of the fleet file."""
    import asyncio

    from router.settings import SettingsLoadError, load_settings

    overrides: dict[str, Any] = {"world_dir": world, "host": host, "port": port, "policy": policy}
    overrides["fleet_file"] = fleet
    explicit = {"http_port": http_port, "metrics_port": metrics_port}
    try:
        settings = load_settings(config, **overrides)
    except SettingsLoadError as error:  # a typo in the TOML file or a SPECROUTE_* variable
        typer.echo(f"invalid settings: {error}", err=True)
        raise typer.Exit(2) from None
    updates = {key: _port(value) for key, value in explicit.items() if value is not None}
    if updates:
        settings = settings.model_copy(update=updates)
    if print_config:
        typer.echo(json.dumps(settings.printable(), indent=2))
        return
    from router.fleet.config import FleetConfigError, check_fleet_settings

    try:
        check_fleet_settings(settings)
    except FleetConfigError as error:  # like a typo in the settings: one line, status 2
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    from router.pooling import pooling_refusal

    refusal = pooling_refusal(settings)
    if refusal is not None:  # never pool unsigned: a writer without the secret could steer
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(2)

    from router.bundle import BundleNotFoundError
    from router.settings import TlsFilesError
    from router.startup import ModelDirError, check_start

    try:
        # What needs no model is refused within a second, before the seconds the engine's
        # imports take (a port or state directory held: main() says it, status 2).
        check_start(settings)
    except (TlsFilesError, BundleNotFoundError, ModelDirError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    from router.server import RunningSidecar, serve

    def announce(running: RunningSidecar) -> None:
        ports = {
            "host": settings.host,
            "grpc": running.grpc_port,
            "http": running.http_port,
            "metrics": running.metrics_port,
        }
        typer.echo(f"specroute serving {json.dumps(ports)}")
        if ports_file is not None:
            temporary = ports_file.with_name(f"{ports_file.name}.tmp")
            temporary.write_text(json.dumps(ports) + "\n")
            temporary.replace(ports_file)

    from classifiers import ClassifierLoadError
    from drafters import TokenizerMismatchError
    from drafters.loader import ModelLoadError
    from router.errors import SidecarError

    settings_wrong = (
        TokenizerMismatchError,
        BundleNotFoundError,
        ClassifierLoadError,
        TlsFilesError,
        ModelLoadError,  # a configured directory that holds no loadable model
    )
    try:
        asyncio.run(serve(settings, on_ready=announce))
    except settings_wrong as error:
        # A configured drafter for another vocabulary, no bundle where the settings point,
        # TLS files that do not make a pair, a model directory without a model: the
        # settings are wrong, like a typo (status 2, as for every command; a supervisor
        # does not restart on it).
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError, SidecarError) as error:
        # Start-up refusals (no world built, a model that does not load): a clear line.
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def _prompt(text: str, raw: bool) -> dict[str, Any]:
    """The request's prompt field: TEXT as the one user message of a conversation (the
    sidecar applies the target's chat template), or with ``--raw`` the text as is."""
    from router.pb import router_pb2 as pb

    if raw:
        return {"text": text}
    user = pb.ChatMessage(role="user", content=text)
    return {"conversation": pb.Conversation(messages=[user])}


def route_command(
    text: Annotated[str, typer.Argument(help="Prompt: a user message (see --raw).")],
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    task_hint: Annotated[str, typer.Option("--task", help="Task cluster hint.")] = "",
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens",
            min=0,
            max=UINT32_MAX,
            help="The answer's budget, if known (0: not).",
        ),
    ] = 0,
    raw: Annotated[bool, RAW_OPTION] = False,
    token: Annotated[str | None, DATA_TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 10.0,
) -> None:
    """Ask a running sidecar for (cluster, drafter, k) for TEXT."""
    from router.pb import router_pb2 as pb

    request = pb.RouteRequest(
        **_prompt(text, raw), task_hint=task_hint, max_new_tokens=max_new_tokens
    )
    _print_message(_ask(address, "Route", request, token, timeout))


def generate_command(
    text: Annotated[str, typer.Argument(help="Prompt: a user message (see --raw).")],
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens", min=1, max=UINT32_MAX, help="Stop after this many tokens."
        ),
    ] = 64,
    drafter: Annotated[str, typer.Option("--drafter", help="Force a drafter.")] = "",
    draft_length: Annotated[
        int | None,
        typer.Option("--k", min=0, max=MAX_DRAFT_LENGTH, help="Force a draft length."),
    ] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy.")] = False,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="With --sample (1.0).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            min=0,
            max=UINT64_MAX,
            help="With --sample: seeds the draws (the same text for the same drafter and k).",
        ),
    ] = None,
    raw: Annotated[bool, RAW_OPTION] = False,
    logprobs: Annotated[
        int | None,
        typer.Option(
            "--logprobs",
            min=0,
            max=20,
            help="After the reply, each token's log-probability under the target and its N "
            "most likely alternatives (0-20), one line a token, on stderr.",
        ),
    ] = None,
    prediction: Annotated[
        Path | None,
        typer.Option(
            "--prediction",
            exists=True,
            dir_okay=False,
            help="A UTF-8 file the reply is expected to mostly repeat (a file to edit, "
            "say): drafted from first (OpenAI's predicted outputs).",
        ),
    ] = None,
    token: Annotated[str | None, DATA_TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 600.0,
) -> None:
    """Generate with speculative decoding in a running sidecar; streams the reply's text
    (special tokens such as the end of turn are never printed)."""
    from router.pb import router_pb2 as pb

    _check_sampling_flags(sample, temperature, seed)
    request = pb.GenerateRequest(
        **_prompt(text, raw),
        max_new_tokens=max_new_tokens,
        sampling=pb.SamplingParams(do_sample=sample, temperature=temperature or 1.0, seed=seed),
        force_drafter=drafter,
        force_draft_length=draft_length,
        logprobs=logprobs,
        prediction=None if prediction is None else _read_text(prediction),
    )
    import grpc

    scored: list[Any] = []
    try:
        stream = _stub(address).Generate(request, metadata=_metadata(token), timeout=timeout)
        for chunk in stream:
            scored.extend(chunk.tokens if logprobs is not None else ())
            if chunk.HasField("decision"):
                d = chunk.decision
                typer.echo(
                    f"[{d.task_cluster} p={d.confidence:.2f} -> {d.drafter} k={d.draft_length},"
                    f" {d.prompt_tokens} prompt tokens]",
                    err=True,
                )
            typer.echo(chunk.text, nl=False)
            if chunk.HasField("stats"):
                s = chunk.stats
                typer.echo("")
                predicted = (
                    f", {s.accepted_prediction_tokens} predicted tokens accepted of "
                    f"{s.accepted_prediction_tokens + s.rejected_prediction_tokens}"
                    if prediction is not None
                    else ""
                )
                typer.echo(
                    f"[{s.generated_tokens} tokens, {s.tokens_per_s:.1f} tok/s, "
                    f"{s.mean_accepted_length:.2f} tokens/step, {s.finish_reason}{predicted}]",
                    err=True,
                )
    except grpc.RpcError as error:
        typer.echo(f"error: {error.code().name}: {error.details()}", err=True)
        raise typer.Exit(1) from None
    for line in _logprob_lines(scored):
        typer.echo(line, err=True)


def _read_text(path: Path) -> str:
    """A file's text (UTF-8), or a one-line error and exit status 2."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        typer.echo(f"error: cannot read {path}: {error}", err=True)
        raise typer.Exit(2) from None


def _logprob_lines(tokens: list[Any]) -> list[str]:
    """One line per token: its id, text, logprob, and its alternatives as text=logprob."""
    return [
        f"{t.id}\t{t.text!r}\t{t.logprob:.4f}\t"
        + " ".join(f"{a.text!r}={a.logprob:.4f}" for a in t.top_logprobs)
        for t in tokens
    ]


def drafters_list_command(
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    token: Annotated[str | None, DATA_TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 10.0,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """List the drafters a running sidecar serves (and those it cannot, with why)."""
    from router.pb import router_pb2 as pb

    request = pb.ListDraftersRequest()
    reply = _ask(address, "ListDrafters", request, token, timeout)
    if as_json:
        _print_message(reply)
        return
    listed = [*reply.drafters, *reply.unavailable]
    name_width = max([16, *(len(d.name) for d in listed)])
    kind_width = max([6, *(len(d.kind) for d in listed)])
    for info in reply.drafters:
        origin = "builtin" if info.builtin else "registered"
        tasks = ",".join(info.tasks) or "-"
        params = f"{info.parameter_count / 1e6:.2f}M" if info.parameter_count else "-"
        options = " ".join(f"{k}={v}" for k, v in sorted(info.options.items()))
        line = (
            f"{info.name:<{name_width}} {info.kind:<{kind_width}} {origin:<10} {params:>8} "
            f"{tasks}  {info.path}"
        )
        typer.echo(f"{line}  {options}".rstrip())
    for missing in reply.unavailable:  # registered on another replica, not loadable here
        typer.echo(
            f"{missing.name:<{name_width}} {missing.kind:<{kind_width}} unavailable: "
            f"{missing.error}"
        )


def drafters_register_command(
    name: Annotated[str, typer.Argument()],
    path: Annotated[
        str,
        typer.Argument(
            help=(
                "Model directory under a configured model root, as the sidecar's host sees "
                "it; a relative or ~ path is made absolute here first."
            )
        ),
    ] = "",
    kind: Annotated[str, typer.Option("--kind")] = "model",
    tasks: Annotated[
        list[str] | None, typer.Option("--task", help="Task it was fine-tuned for.")
    ] = None,
    sample_file: Annotated[
        Path | None,
        typer.Option(
            "--sample",
            help="Fine-tuning sample: a prompt a line, or JSON lines if named *.jsonl (as "
            "distill writes finetune_sample.jsonl). Default: the directory's "
            "finetune_sample.jsonl, if any.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    options: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help=(
                "KEY=VALUE, repeatable: ngram min_n, max_n; self exit_layer; "
                "copy-or-model min_match, model_k."
            ),
        ),
    ] = None,
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    token: Annotated[str | None, TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 300.0,
) -> None:
    """Register a drafter with a running sidecar (hot: eligible for the next request)."""
    from router.pb import router_pb2 as pb

    try:
        sample = _sample_lines(sample_file) if sample_file is not None else []
    except UnicodeDecodeError as error:
        raise typer.BadParameter(f"not UTF-8 text: {error}", param_hint="--sample") from None
    request = pb.RegisterDrafterRequest(
        name=name,
        kind=kind,
        path=_absolute(path),
        tasks=tasks or [],
        finetune_sample=[s for s in sample if s],
        options=_key_values(options or [], "--option"),
    )
    _print_message(_ask(address, "RegisterDrafter", request, token, timeout))


def _check_sampling_flags(sample: bool, temperature: float | None, seed: int | None) -> None:
    """Usage errors for sampling flags that would be ignored: ``--temperature 0`` with
    ``--sample`` reached the sidecar as "unset" and sampled at 1.0; ``--temperature`` or
    ``--seed`` without ``--sample`` decoded greedily without a word."""
    if not sample:
        given = [
            flag
            for flag, value in (("--temperature", temperature), ("--seed", seed))
            if value is not None
        ]
        if given:
            raise typer.BadParameter(
                "applies with --sample only (greedy decoding draws nothing)",
                param_hint=" and ".join(given),
            )
        return
    if temperature is not None and not temperature > 0:
        raise typer.BadParameter(
            f"must be > 0 when sampling, got {temperature:g} (greedy: leave out --sample)",
            param_hint="--temperature",
        )


def _sample_lines(path: Path) -> list[str]:
    """``--sample``: JSON lines (strings, or objects with "text"), as a drafter directory's
    ``finetune_sample.jsonl`` holds them, where the file is named ``*.jsonl`` (its lines
    were sent as they were, JSON and all); else a prompt a line. The first
    ``MAX_SAMPLE_TEXTS`` texts, as from a drafter directory's file (the sidecar refuses
    more), with a warning when the file holds more."""
    from router.bundle import sample_texts
    from router.domain import MAX_SAMPLE_TEXTS

    lines = path.read_text(encoding="utf-8").splitlines()  # UnicodeDecodeError: --sample's
    if path.suffix == ".jsonl":
        texts = list(sample_texts(lines, str(path), limit=len(lines)))
    else:
        texts = [line for line in lines if line.strip()]
    if len(texts) > MAX_SAMPLE_TEXTS:
        typer.echo(
            f"warning: --sample: {path} holds {len(texts)} texts; the first "
            f"{MAX_SAMPLE_TEXTS} are sent (a drafter keeps at most {MAX_SAMPLE_TEXTS})",
            err=True,
        )
    return texts[:MAX_SAMPLE_TEXTS]


def _absolute(path: str) -> str:
    """``path`` made absolute on this (the client's) host: the sidecar resolves what it is
    sent against its own working directory and home, which a relative path typed here
    does not mean (the same host, a different directory: outside the model roots)."""
    if not path or Path(path).is_absolute():
        return path
    return str(Path(path).expanduser().resolve())


def _key_values(pairs: Sequence[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a malformed one is a usage error naming ``flag``."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        parsed[key.strip()] = value.strip()
    return parsed


def drafters_remove_command(
    name: Annotated[str, typer.Argument()],
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    token: Annotated[str | None, TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 30.0,
) -> None:
    """Remove a registered drafter from a running sidecar."""
    from router.pb import router_pb2 as pb

    request = pb.RemoveDrafterRequest(name=name)
    _print_message(_ask(address, "RemoveDrafter", request, token, timeout))


def policy_show_command(
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    token: Annotated[str | None, DATA_TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 10.0,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Show a running sidecar's policy state per context."""
    from router.pb import router_pb2 as pb

    request = pb.GetPolicyStateRequest()
    state = _ask(address, "GetPolicyState", request, token, timeout)
    if as_json:
        _print_message(state)
        return
    typer.echo(f"policy {state.policy} version {state.version}")
    for context in state.contexts:
        typer.echo(
            f"  {context.task_cluster:<14} bucket {context.length_bucket}"
            f"{' structured' if context.structured else ''}: "
            f"{context.chosen_drafter} k={context.chosen_k} ({context.requests} requests)"
        )
        for arm in context.arms:
            typer.echo(
                f"      {arm.drafter:<14} a={arm.acceptance_mean:.3f} best_k={arm.best_k} "
                f"S={arm.expected_speedup:.2f} chosen {arm.decisions}x"
            )


def policy_set_command(
    name: Annotated[str, typer.Argument(help="thompson, ucb, fixed, static, oracle or none.")],
    config: Annotated[
        str, typer.Option("--config", help="The policy's configuration, a JSON object.")
    ] = "",
    reset: Annotated[
        bool, typer.Option("--reset", help="Start from the priors, not the saved state.")
    ] = False,
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    token: Annotated[str | None, TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 60.0,
) -> None:
    """Switch a running sidecar's policy (admin): the current one's state is saved, and a
    policy served before comes back with its last state unless --reset."""
    from router.pb import router_pb2 as pb

    if config:
        try:
            json.loads(config)
        except json.JSONDecodeError as error:
            raise typer.BadParameter(f"not JSON: {error}", param_hint="--config") from None
    request = pb.SetPolicyRequest(policy=name, config_json=config, reset_state=reset)
    state = _ask(address, "SetPolicy", request, token, timeout)
    typer.echo(f"policy {state.policy} version {state.version}")


def classifier_reload_command(
    path: Annotated[
        str, typer.Argument(help="The new classifier's directory, under a model root.")
    ],
    address: Annotated[str, ADDRESS_OPTION] = DEFAULT_ADDRESS,
    token: Annotated[str | None, TOKEN_OPTION] = None,
    timeout: Annotated[float, TIMEOUT_OPTION] = 60.0,
) -> None:
    """Swap a running sidecar's classifier for the one in PATH (admin).

    It is validated first: one refused leaves the current classifier serving. For this
    process only: a restart loads the configured classifier_dir.
    """
    from router.pb import router_pb2 as pb

    request = pb.ReloadClassifierRequest(path=_absolute(path))
    _print_message(_ask(address, "ReloadClassifier", request, token, timeout))


def fleet_check_command(
    fleet_file: Annotated[Path, typer.Argument(help="The fleet file (TOML) to check.")],
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe/--no-probe",
            help="Ask each replica what a sidecar asks before it serves (health, model, "
            "tokenizer, max_model_len).",
        ),
    ] = True,
) -> None:
    """Check a fleet file as `serve --fleet` would at start (exit 2 if it cannot be
    served) and, unless --no-probe, each of its replicas (exit 1 if one does not serve):
    before a deployment, or before replacing the file a running sidecar reads again."""
    import asyncio

    from router.fleet.check import probed, unprobed
    from router.fleet.config import FleetConfigError, check_fleet_settings
    from router.settings import SettingsLoadError, load_settings

    try:
        settings = load_settings(config, fleet_file=fleet_file)
        fleet = check_fleet_settings(settings)
    except (SettingsLoadError, FleetConfigError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    assert fleet is not None
    checks = unprobed(fleet)
    if probe:
        from drafters.loader import load_tokenizer
        from router.components import target_dir_of
        from router.fleet.replica import TOKENIZER_PROBE

        tokenizer = load_tokenizer(target_dir_of(settings))
        ids = tuple(tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False))
        checks = asyncio.run(probed(fleet, ids, f"fleet file {fleet_file}"))
    for check in checks:
        typer.echo(check.line())
    down = [check.name for check in checks if check.serving is False]
    typer.echo(f"replicas: {len(checks)}, not serving: {len(down)}" if probe else "servable")
    if down:
        raise typer.Exit(1)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this package's commands to the root app and the ``bench`` group."""
    app.command("serve")(serve_command)
    app.command("route")(route_command)
    app.command("generate")(generate_command)
    drafters = _group(app, "drafters", "Drafters: list, register and remove on a sidecar.")
    drafters.command("list")(drafters_list_command)
    drafters.command("register")(drafters_register_command)
    drafters.command("remove")(drafters_remove_command)
    policy = _group(app, "policy", "The serving policy.")
    policy.command("show")(policy_show_command)
    policy.command("set")(policy_set_command)
    from classifiers.cli import CLASSIFIER_HELP

    _group(app, "classifier", CLASSIFIER_HELP).command("reload")(classifier_reload_command)
    fleet = _group(app, "fleet", "A vLLM fleet's file and replicas.")
    fleet.command("check")(fleet_check_command)
