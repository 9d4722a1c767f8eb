"""Common mistakes on the command line: one line and exit status 2 (a usage error), never a
traceback, and never minutes of work before the refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from router.cli import build_app


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "hi", "--k", "-1"],  # uint32 fields: "ValueError: Value out of range"
        ["generate", "hi", "--seed", "-1"],
        ["generate", "hi", "--logprobs", "21"],
        ["generate", "hi", "--max-new-tokens", "0"],
        ["route", "hi", "--max-new-tokens", "-1"],
        ["generate", "hi", "--sample", "--seed", str(2**64)],  # past the wire's uint64
        ["generate", "hi", "--k", str(2**32)],  # and uint32: both a traceback before
        ["generate", "hi", "--max-new-tokens", str(2**32)],
        ["route", "hi", "--max-new-tokens", str(2**32)],
    ],
)
def test_a_number_out_of_its_range_is_a_usage_error(args: list[str]) -> None:
    result = CliRunner().invoke(build_app(), [*args, "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output, result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # 0 is "unset" on the wire: it sampled at 1.0.
        (["--sample", "--temperature", "0"], "must be > 0 when sampling, got 0"),
        # Greedy decoding ignored both without a word.
        (["--temperature", "1.5"], "applies with --sample only"),
        (["--seed", "3"], "applies with --sample only"),
        # The sidecar refuses a draft over 32 (its status 1, after the call).
        (["--k", "33"], "Invalid value"),
    ],
)
def test_generate_refuses_sampling_flags_it_would_ignore(args: list[str], said: str) -> None:
    result = CliRunner().invoke(build_app(), ["generate", "hi", *args, "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # gRPC took these, and failed (or reached another port) only once called.
        (["route", "hi", "--address", "127.0.0.1"], "is not host:port"),
        (["route", "hi", "--address", "127.0.0.1:99999"], "is not host:port"),
        (["route", "hi", "--address", ""], "is not host:port"),
        (["drafters", "list", "--address", "http://127.0.0.1:1"], "no scheme"),
        (["replay", "--trace", "uniform", "--address", "nowhere"], "is not host:port"),
        (["bench", "load", "--address", ""], "is not host:port"),
        (["bench", "load", "--address", "127.0.0.1:1", "--pid", "99999999"], "no process"),
        # grpc's "Invalid metadata" (INTERNAL, status 1) with C-library lines before it.
        (["route", "hi", "--token", "tök"], "characters a header cannot carry"),
    ],
)
def test_an_address_or_token_a_call_cannot_use_is_a_usage_error(args: list[str], said: str) -> None:
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.replace("│", " ").split()), result.output


def test_bench_load_reads_the_admin_token_as_the_other_data_commands_do() -> None:
    """It read SPECROUTE_DATA_TOKEN only: against a sidecar with an admin token alone, the
    token every other command found was not sent. (A token a header cannot carry shows
    which variables were read.)"""
    result = CliRunner().invoke(
        build_app(),
        ["bench", "load", "--address", "127.0.0.1:1"],
        env={"SPECROUTE_ADMIN_TOKEN": "tök", "SPECROUTE_DATA_TOKEN": None},
    )
    assert result.exit_code == 2, result.output
    assert "characters a header cannot carry" in " ".join(result.output.split())


def test_command_lists_do_not_break_sentences_where_the_source_does() -> None:
    """Typer's help printed a docstring's source line breaks: "HTTP fronts, Prometheus" /
    "metrics; with --fleet ..." in `specroute --help`, at any terminal width."""
    shown = CliRunner().invoke(build_app(), ["--help"], env={"COLUMNS": "250"}).output
    (serve,) = [line for line in shown.splitlines() if line.startswith("│ serve ")]
    assert "Prometheus metrics; with --fleet" in serve, shown


def test_a_ca_file_that_holds_no_certificate_is_a_usage_error(tmp_path: Path) -> None:
    """It was read as roots, and each call failed its handshake with the TLS library's
    log lines before grpc's UNAVAILABLE."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    result = CliRunner().invoke(
        build_app(),
        ["drafters", "list", "--address", "127.0.0.1:1"],
        env={"SPECROUTE_CA_FILE": str(not_pem)},
    )
    assert result.exit_code == 2, result.output
    assert f"SPECROUTE_CA_FILE: {not_pem} holds no PEM certificate" in result.output


def test_a_token_with_a_secret_files_newline_is_sent_without_it() -> None:
    """Kubernetes secrets end in a newline, which the sidecar strips from its own token;
    the client sent it and grpc failed every call as INTERNAL "Invalid metadata"."""
    from router.serve_cli import token_option

    assert token_option("tok\n") == "tok"
    assert token_option("  ") is None


def test_your_own_target_without_a_classifier_and_no_world_says_to_set_classifier_dir(
    tmp_path: Path,
) -> None:
    """It said to build the world (8-11 minutes), not that classifier_dir was missing."""
    target = tmp_path / "target"
    target.mkdir()
    env = {
        "SPECROUTE_HOME": str(tmp_path / "home"),
        "SPECROUTE_TARGET_DIR": str(target),
        "SPECROUTE_STATE_DIR": str(tmp_path / "state"),
    }
    done = _run("serve", "--port", "0", "--http-port", "-1", "--metrics-port", "-1", env=env)
    assert done.returncode == 2, done.stderr
    assert "serving your own target_dir, set classifier_dir too" in done.stderr, done.stderr


def test_a_model_directory_that_is_not_one_is_named_by_its_setting(tmp_path: Path) -> None:
    """A bare "/nonexistent: no such directory" after the imports, status 1; a drafter's
    only once the target had loaded."""
    a_file = tmp_path / "weights.bin"
    a_file.write_text("x")
    ports = ("--port", "0", "--http-port", "-1", "--metrics-port", "-1")
    cases = (
        ({"SPECROUTE_TARGET_DIR": "/nonexistent"}, "target_dir: /nonexistent does not exist"),
        ({"SPECROUTE_CLASSIFIER_DIR": str(a_file)}, "classifier_dir: "),
        ({"SPECROUTE_DRAFTER_DIRS": f'{{"foo": "{a_file}"}}'}, "drafter_dirs.foo: "),
    )
    for env, said in cases:
        state = {"SPECROUTE_STATE_DIR": str(tmp_path / "state")}
        done = _run("serve", *ports, env={**state, **env})
        assert done.returncode == 2 and done.stderr.startswith(f"error: {said}"), done.stderr
        assert "Traceback" not in done.stderr


def test_a_drafter_directory_without_a_model_stops_the_start_before_the_target_loads(
    serving_world: Any, tmp_path: Path
) -> None:
    """A drafter_dirs entry without config.json, or with pickle weights only, was found
    once the target's weights had loaded (minutes for a 7B), named by its path alone, with
    status 1 (a supervisor restarts on it)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    world = str(serving_world.world.root)  # its classifier trained already
    env = {"SPECROUTE_WORLD_DIR": world, "SPECROUTE_STATE_DIR": str(tmp_path / "s")}
    ports = ("--port", "0", "--http-port", "-1", "--metrics-port", "-1")
    for directory, said in ((empty, "has no config.json"), (pickled, "has only pickle weights")):
        drafters = {"SPECROUTE_DRAFTER_DIRS": json.dumps({"mine": str(directory)})}
        done = _run("serve", *ports, env={**env, **drafters})
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: drafter_dirs.mine: ") and said in last, done.stderr
        assert "loaded " not in done.stderr  # before any weights


def test_a_model_root_that_is_not_a_directory_is_said_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted without a word; each registration under it was then refused."""
    from router.settings import Settings
    from router.startup import check_model_dirs

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    settings = Settings(model_roots=[tmp_path, a_file, tmp_path / "nowhere"])
    with caplog.at_level("WARNING", logger="router.startup"):
        check_model_dirs(settings)
    said = [r.getMessage() for r in caplog.records]
    assert [m.split(" is not")[0] for m in said] == [
        f"model_roots: {a_file}",
        f"model_roots: {tmp_path / 'nowhere'}",
    ]


def test_a_misspelt_trace_is_refused_before_a_world_is_built(tmp_path: Path) -> None:
    """With no world built, a typo in --trace built one first (8-9 minutes) and only then
    said "unknown trace"."""
    home = tmp_path / "home"
    for trace, said in (("bogus", "unknown trace 'bogus'"), ("none.jsonl", "no trace file")):
        done = _run(
            "replay",
            "--trace",
            trace,
            "--address",
            "127.0.0.1:1",
            env={"SPECROUTE_HOME": str(home)},
        )
        assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not home.exists() or not any(home.rglob("manifest.json"))


def test_an_unknown_demo_scale_is_refused_as_world_build_refuses_it() -> None:
    done = _run("demo", "--scale", "bogus")
    assert done.returncode == 2 and "unknown scale 'bogus'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_config_file_named_by_the_environment_is_named_in_its_error(tmp_path: Path) -> None:
    """The message read "config file None is not valid TOML" when $SPECROUTE_CONFIG named it."""
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [\n")
    done = _run("serve", "--print-config", env={"SPECROUTE_CONFIG": str(bad)})
    assert done.returncode == 2 and f"config file {bad} is not valid TOML" in done.stderr


def test_tls_files_that_do_not_make_a_pair_stop_serve_like_a_typo(tmp_path: Path) -> None:
    """Exit status 1 (a start-up failure) before; wrong settings are status 2."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage")
    config = tmp_path / "sidecar.toml"
    config.write_text(f'[tls]\ncert_file = "{garbage}"\nkey_file = "{garbage}"\n')
    done = _run(
        "serve", "--config", str(config), "--port", "0", env={"SPECROUTE_HOME": str(tmp_path)}
    )
    assert done.returncode == 2 and "tls: cannot use" in done.stderr, done.stderr


def test_a_cluster_count_the_data_cannot_give_is_a_usage_error(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"text": "prompt number {i}"}}\n' for i in range(20)))
    done = _run(
        "classifier", "train", "--data", str(data), "--out", str(tmp_path / "c"), "--clusters", "1"
    )
    assert done.returncode == 2 and "--clusters" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_clusters_waits_at_most_its_timeout() -> None:
    """`clusters` had no --timeout (10 s, fixed), unlike every other client command."""
    import socket

    with socket.socket() as silent:  # listens, never answers: a stuck sidecar
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        result = CliRunner().invoke(
            build_app(), ["clusters", "--address", address, "--timeout", "0.5"]
        )
    assert result.exit_code == 1 and "DEADLINE_EXCEEDED" in result.output, result.output


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SPECROUTE_DEVICE", "gpu", "'gpu' is not a device"),  # torch's traceback after start
        ("SPECROUTE_DATA_TOKEN", "", "empty or blank"),  # left the data calls open, silently
        ("SPECROUTE_ADMIN_TOKEN", "  ", "empty or blank"),
    ],
)
def test_a_setting_that_cannot_mean_anything_stops_serve_at_once(
    variable: str, value: str, message: str
) -> None:
    done = _run("serve", "--print-config", env={variable: value})
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_home_in_a_model_path_setting_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "~/models/qwen" as target_dir was read as a Hugging Face repo id."""
    from router.settings import Settings

    monkeypatch.setenv("SPECROUTE_TARGET_DIR", "~/models/qwen")
    monkeypatch.setenv("SPECROUTE_CLASSIFIER_DIR", "~/cls")
    settings = Settings()
    assert settings.target_dir == Path.home() / "models" / "qwen"
    assert settings.classifier_dir == Path.home() / "cls"


def test_cuda_asked_of_a_torch_without_it_is_one_clear_error() -> None:
    import torch

    from drafters.loader import default_placement

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        default_placement("cuda", "auto")


@pytest.mark.parametrize("name", ["none", "ngram", "bad name!"])
def test_a_configured_drafter_name_registration_would_refuse_is_a_settings_error(
    name: str,
) -> None:
    """{"none": dir} was loaded, then silently replaced by plain decoding; "bad name!"
    served under a name no RegisterDrafter could give."""
    from pydantic import ValidationError

    from router.settings import Settings

    with pytest.raises(ValidationError, match="drafter name"):
        Settings(drafter_dirs={name: Path("/models/d")})


def test_home_in_tls_file_settings_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "~/redis-ca.pem" was refused as missing (checked before any expansion)."""
    from router.settings import PoolingSettings, TlsSettings

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ca.pem").write_text("x")
    tls_url = "rediss://redis.internal:6380/0"
    pooling = PoolingSettings(redis_url=tls_url, tls_ca_file="~/ca.pem")  # type: ignore[arg-type]
    assert pooling.tls_ca_file == tmp_path / "ca.pem"
    with pytest.raises(ValueError, match="rediss://"):  # ignored, silently, with redis://
        PoolingSettings(tls_ca_file="~/ca.pem")  # type: ignore[arg-type]
    tls = TlsSettings(cert_file=Path("~/c.pem"), key_file=Path("~/k.pem"))
    assert (tls.cert_file, tls.key_file) == (tmp_path / "c.pem", tmp_path / "k.pem")


def test_distill_options_that_cannot_work_are_one_line_errors(tmp_path: Path) -> None:
    """--cpus abc raised ValueError, --cpus 99 was ignored, --out naming a file raised
    NotADirectoryError, --from a directory that is not a model a ModelLoadError: each a
    traceback (the sidecar's automatic runs pass their own valid options)."""
    from router.capture import CaptureSettings, CaptureStore

    state = tmp_path / "state"
    store = CaptureStore(state, CaptureSettings(enabled=True))
    store.record("math", (1, 2, 3), (4, 5))
    store.record("math", (1, 2, 4), (4, 6))
    store.close()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "notmodel").mkdir()
    common = ["drafters", "distill", "--cluster", "math", "--state-dir", str(state)]
    common += ["--address", "127.0.0.1:1"]
    out = ["--out", str(tmp_path / "out")]
    for args, status, says in (
        ([*out, "--cpus", "abc"], 2, "not a list of CPU ids"),
        ([*out, "--cpus", "99999"], 2, "Invalid value for --cpus"),
        ([*out, "--cpus", "-1"], 2, "Invalid value for --cpus"),  # sched_setaffinity's ValueError
        (["--out", str(tmp_path / "file.txt")], 2, "is a file, not a directory"),
        ([*out, "--from", str(tmp_path / "notmodel")], 1, "error: "),
    ):
        done = _run(*common, *args)
        assert done.returncode == status and says in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_classifier_train_refuses_what_it_would_silently_misread(tmp_path: Path) -> None:
    """One line without "task" switched the whole run to cluster discovery and threw every
    label away; --clusters 0 was falsy and ignored; --false-flag-rate 1.5 failed with
    numpy's error after the whole grid had been fit."""
    data = tmp_path / "prompts.jsonl"
    lines = [f'{{"text": "prompt number {i}", "task": "t{i % 2}"}}\n' for i in range(20)]
    data.write_text("".join(lines) + '{"text": "one without a task"}\n')
    out = ["--out", str(tmp_path / "c")]
    for args, says in (
        ([], "have no 'task'"),
        (["--clusters", "0"], "at least 2"),
        (["--false-flag-rate", "1.5"], "--false-flag-rate"),
    ):
        done = _run("classifier", "train", "--data", str(data), *out, *args)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_a_misspelt_variable_is_named_at_start_with_the_setting_meant() -> None:
    """pydantic-settings skips a SPECROUTE_* name no setting reads: a misspelt
    SPECROUTE_DATA_TOKN left the data calls open without a word."""
    done = _run(
        "serve",
        "--print-config",
        env={
            "SPECROUTE_DATA_TOKN": "secret",
            "SPECROUTE_LIMIT__MAX_NEW_TOKENS": "64",  # the group's name misspelt
            "SPECROUTE_ADDRESS": "127.0.0.1:1",  # the client's: not a setting, not a typo
            "SPECROUTE_LIMITS__MAX_NEW_TOKENS": "64",
        },
    )
    assert done.returncode == 0, done.stderr
    assert (
        "SPECROUTE_DATA_TOKN is not a specroute setting and is ignored "
        "(did you mean SPECROUTE_DATA_TOKEN?)" in done.stderr
    ), done.stderr
    assert "(did you mean SPECROUTE_LIMITS__MAX_NEW_TOKENS?)" in done.stderr, done.stderr
    assert "SPECROUTE_ADDRESS" not in done.stderr and done.stderr.count("not a specroute") == 2


def test_every_setting_and_client_variable_is_known() -> None:
    from router.settings import OTHER_ENV_NAMES, setting_env_names, unknown_env_lines

    names = [*setting_env_names(), *OTHER_ENV_NAMES]
    assert "SPECROUTE_POOLING__REDIS_URL" in names and "SPECROUTE_PORT" in names
    assert unknown_env_lines(dict.fromkeys(names, "x")) == []
    assert unknown_env_lines({"specroute_port": "1", "HOME": "/root"}) == []
    assert unknown_env_lines({"SPECROUTE_NOTHING_LIKE_IT": "1"}) == [
        "SPECROUTE_NOTHING_LIKE_IT is not a specroute setting and is ignored"
    ]


def test_files_that_are_not_text_and_paths_that_are_not_files_are_one_line(
    tmp_path: Path,
) -> None:
    """A settings or fleet file that is not UTF-8 raised UnicodeDecodeError with a
    traceback; --config naming a directory said it did not exist."""
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe port = 1\n")
    for args, says in (
        (["serve", "--config", str(binary), "--print-config"], "is not UTF-8 text"),
        (["serve", "--config", str(tmp_path), "--print-config"], "is not a file"),
        (["serve", "--fleet", str(binary)], "not UTF-8 text"),
        (["capture", "stats", "--config", str(binary)], "is not UTF-8 text"),
        # Written once serving: the sidecar had loaded and announced itself, then stopped.
        (["serve", "--ports-file", str(tmp_path), "--print-config"], "is a directory, not"),
        (["serve", "--ports-file", str(tmp_path / "no" / "p.json")], "no is not a directory"),
    ):
        done = _run(*args)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_benchmark_typos_are_told_before_any_work(tmp_path: Path) -> None:
    """A misspelt replay policy or schedule was told only after the sidecar was reached
    and calibrated (76 s, and only "could not be reached" with no sidecar); an unknown
    policy-simulator scenario ran nothing and exited 0; bench load's --address without a
    port raised IndexError; capture stats on a mistyped state directory said "nothing
    captured" with status 0."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"text": "hello", "task": "chat"}\n')
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xc1\xff not text\n")
    replay = ["replay", "--trace", str(trace), "--address", "127.0.0.1:1"]
    for args, status, says in (
        ([*replay, "--policies", "none,tompson"], 2, "unknown policies ['tompson']"),
        ([*replay, "--schedule", "bogus"], 2, "unknown schedule 'bogus'"),
        (["bench", "policy", "--scenario", "bogus"], 2, "unknown scenario 'bogus'"),
        (["bench", "load", "--address", "localhost"], 2, "is not host:port"),
        (["capture", "stats", "--state-dir", str(tmp_path / "stat")], 2, "not a state directory"),
        (
            ["clusters", "--state-dir", str(tmp_path / "stat"), "--address", "127.0.0.1:1"],
            2,
            "not a state directory",
        ),
        # The decode error alone, the file not named.
        ([*replay[:2], str(binary), *replay[3:]], 2, "binary.jsonl is not UTF-8 text"),
    ):
        done = _run(*args, env={"SPECROUTE_HOME": str(tmp_path / "home")})
        said = " ".join(done.stderr.split())
        assert done.returncode == status and says in said, (args, done.stderr)
        assert "Traceback" not in done.stderr
