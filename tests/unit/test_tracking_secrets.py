"""MLflow and credentials: what is masked (secrets only), URI redaction, the reachability check and its credentials,
and train/report failing fast, in one line, on an unreachable tracking server (no Ray, no training)."""

from __future__ import annotations

import base64
import http.server
import os
import socket
import threading
import time

import pytest
import yaml

from launcher import tracking
from launcher.cli import main
from trainer.config import ConfigError, flatten, parse_config
from trainer.logging import redact_text, redact_uri

PASSWORD = "s3cr3t-Pa55"
MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(autouse=True)
def no_mlflow_variables(monkeypatch):
    """Neither the caller's MLflow settings nor those ``tracking.client`` sets leak into or out of a test."""
    for name in MLFLOW_VARIABLES:
        monkeypatch.setenv(name, "")  # registers the variable's original state, restored after the test
        monkeypatch.delenv(name)


@pytest.fixture()
def server():
    """An HTTP server on 127.0.0.1 answering ``status`` and recording each request's path and Authorization."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(self.server.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.seen, httpd.status = [], 200
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------------ redaction

@pytest.mark.parametrize("uri, secret, shown", [
    ("http://user:pw-123@mlflow.example:5000", "pw-123", "http://***@mlflow.example:5000"),
    ("http://:tok-123@mlflow.example", "tok-123", "http://***@mlflow.example"),
    ("http://user:p@ss-123@mlflow.example:5000/prefix", "ss-123", "http://***@mlflow.example:5000/prefix"),
    ("https://user:pa/ss-123@mlflow.example", "ss-123", "https://***@mlflow.example"),
    ("https://mlflow.example/?token=tok-123&run=1", "tok-123", "https://mlflow.example/?token=***&run=1"),
    ("https://mlflow.example:443/x?access_token=tok-123", "tok-123", "https://mlflow.example:443/x?access_token=***"),
    ("https://mlflow.example?api_key=key-123", "key-123", "https://mlflow.example?api_key=***"),
    ("https://mlflow.example?user=me&password=pw-123", "pw-123", "https://mlflow.example?user=me&password=***"),
])
def test_redaction_masks_the_secret_and_keeps_the_server_readable(uri, secret, shown):
    assert redact_uri(uri) == shown
    assert secret not in shown and "mlflow.example" in shown
    assert redact_text(f"request to '{uri}' failed: {uri}\n") == f"request to '{shown}' failed: {shown}\n"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example/prefix?run=1",
                                 "sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "databricks"])
def test_uris_without_credentials_are_left_as_they_are(uri):
    assert redact_uri(uri) == uri


def trial_config(**overrides):
    return parse_config({"algorithm": "kd", "student": {"name": "student", "tokenizer": "tok-v2"},
                         "teachers": [{"name": "teacher", "tokenizer": "tok-t"}],
                         "data": {"token_cache": "runs/tokenized"},
                         "noise": {"student": {"mode": "token", "token": "[MASK]"}}, **overrides})


def test_masking_keeps_tokenizer_and_token_settings_in_clear():
    logged = tracking.param_values(flatten(trial_config()))
    assert logged["student.tokenizer"] == "tok-v2" and logged["teachers.tokenizer"] == "['tok-t']"
    assert logged["data.token_cache"] == "runs/tokenized"
    assert logged["noise.student.token"] == "[MASK]" and logged["noise.teacher.token"] == "[UNK]"


@pytest.mark.parametrize("key", ["password", "db.passwd", "tracking.secret", "api_key", "s3.access_key",
                                 "aws.secret_key", "hf_token", "tracking.api_token", "HF_TOKEN", "apiKey",
                                 "proxy.auth", "gcs.credentials"])
def test_keys_named_like_a_credential_are_masked(key):
    assert tracking.param_values({key: PASSWORD}) == {key: "***"}


@pytest.mark.parametrize("key", ["token", "noise.student.token", "pad_token", "tokenizer", "token_cache",
                                 "password_file", "auth_mode", "tracking.mlflow_uri"])
def test_keys_that_only_mention_a_credential_word_are_logged(key):
    assert tracking.param_values({key: "value"}) == {key: "value"}


def test_mlflow_run_holds_no_credentials(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = tracking.MLflowLogger(uri, "metadistil", tags={"hf_token": PASSWORD,
                                                            "server": f"http://u:{PASSWORD}@h:5000"})
    logger.log_params({"student.tokenizer": "tok-v2", "tracking.mlflow_uri": f"http://u:{PASSWORD}@h:5000",
                       "hf_token": PASSWORD})
    logger.finish("FAILED", f"MlflowException: API request to http://u:{PASSWORD}@h:5000/api failed")
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.data.params["student.tokenizer"] == "tok-v2"
    assert run.data.params["tracking.mlflow_uri"] == "http://***@h:5000"
    assert run.data.tags["server"] == "http://***@h:5000" and "http://***@h:5000/api" in run.data.tags["error"]
    assert PASSWORD not in repr(run.data)


def test_the_mlflow_client_sees_no_credentials_in_its_uri():
    client = tracking.client(f"http://alice:{PASSWORD}@127.0.0.1:5000/prefix")
    assert client.tracking_uri == "http://127.0.0.1:5000/prefix"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", PASSWORD)


# --------------------------------------------------------------------------------------------------- reachability

def test_reachability_check_sends_the_uri_credentials_as_basic_auth(server):
    port = server.server_address[1]
    tracking.check_reachable(f"http://alice:p@ss{PASSWORD}@127.0.0.1:{port}/prefix/")
    expected = "Basic " + base64.b64encode(f"alice:p@ss{PASSWORD}".encode()).decode()
    assert server.seen == [("/prefix/health", expected)]


def test_mlflow_user_and_password_variables_win_over_the_uri(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    tracking.check_reachable(f"http://alice:{PASSWORD}@127.0.0.1:{server.server_address[1]}")
    assert server.seen == [("/health", "Basic " + base64.b64encode(b"bob:from-env").decode())]


def test_refused_credentials_are_one_clear_error(server):
    server.status = 401
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{server.server_address[1]}"
    with pytest.raises(ConfigError, match="refused the credentials") as err:
        tracking.check_reachable(uri)
    assert redact_uri(uri) in str(err.value) and PASSWORD not in str(err.value)


def test_unreachable_server_fails_fast_naming_the_redacted_uri(dead_port):
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{dead_port}"
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        tracking.check_reachable(uri)
    assert time.monotonic() - start < 10
    assert f"MLflow tracking server http://***@127.0.0.1:{dead_port} is unreachable" in str(err.value)
    assert PASSWORD not in str(err.value) and "alice" not in str(err.value)


def test_a_server_that_never_answers_times_out():
    with socket.socket() as silent:  # listens, so connections succeed, but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(ConfigError, match=r"is unreachable .*timed out"):
            tracking.check_reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)


def test_a_uri_whose_port_is_not_a_number_is_refused_without_showing_it():
    with pytest.raises(ConfigError, match=r"http://\*\*\*@host:5000 is not valid") as err:
        tracking.check_reachable(f"http://alice:{PASSWORD}/x@host:5000")
    assert PASSWORD not in str(err.value)


# ------------------------------------------------------------------------------------------------------------ CLI

def write_trial(tmp_path, **overrides) -> str:
    # Model names that do not exist: a command that got as far as loading them would fail differently.
    raw = {"algorithm": "finetune", "student": {"name": "no-such/model"}, "data": {"name": "synthetic"},
           "output": {"dir": str(tmp_path / "out")}, **overrides}
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def assert_one_line_error(capsys, needle: str) -> None:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and needle in captured.err, captured
    assert "Traceback" not in captured.err + captured.out
    assert PASSWORD not in captured.err + captured.out


def write_sweep(tmp_path, **base) -> str:
    spec = {"name": "secrets", "base": {"data": {"name": "synthetic"}, **base},
            "students": {"s": {"name": "no-such/model"}}, "grid": {"algorithm": ["finetune"], "seed": [1]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.parametrize("command", ["train", "report", "sweep"])
def test_commands_fail_fast_on_an_unreachable_server(command, tmp_path, dead_port, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:{dead_port}")
    argv = {"train": ["train", write_trial(tmp_path)], "report": ["report", "--sweep", "demo"],
            "sweep": ["sweep", write_sweep(tmp_path)]}[command]
    start = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - start < 10
    assert_one_line_error(capsys, f"MLflow tracking server http://***@127.0.0.1:{dead_port} is unreachable")
    assert not (tmp_path / "out").exists()


def test_report_tracking_uri_flag_is_checked_too(tmp_path, dead_port, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--sweep", "demo", "--tracking-uri", f"http://:{PASSWORD}@127.0.0.1:{dead_port}"]) == 2
    assert_one_line_error(capsys, f"http://***@127.0.0.1:{dead_port} is unreachable")


@pytest.mark.parametrize("command", ["train", "validate"])
def test_credentials_in_the_trial_config_are_refused(command, tmp_path, capsys):
    path = write_trial(tmp_path, tracking={"mlflow_uri": f"http://alice:{PASSWORD}@127.0.0.1:5000"})
    assert main([command, path]) == 2
    assert_one_line_error(capsys, "tracking.mlflow_uri: http://***@127.0.0.1:5000 carries credentials")


def test_credentials_in_a_sweep_base_config_are_refused_at_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = write_sweep(tmp_path, tracking={"mlflow_uri": f"https://mlflow.example?token={PASSWORD}"})
    assert main(["sweep", spec, "--dry-run"]) == 2
    assert_one_line_error(capsys, "tracking.mlflow_uri: https://mlflow.example?token=*** carries credentials")


def test_an_unexpected_error_is_shown_with_its_traceback_but_without_the_password(monkeypatch, capsys):
    def fail(args):
        raise RuntimeError(f"API request to http://alice:{PASSWORD}@mlflow.example/api failed")

    monkeypatch.setattr("launcher.cli._explain", fail)
    assert main(["explain"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "RuntimeError: API request to http://***@mlflow.example/api" in err
    assert PASSWORD not in err


def test_the_stdout_logger_prints_a_failed_trial_without_the_password():
    from trainer.logging import StdoutLogger

    printed = []
    StdoutLogger(printed.append).finish("FAILED", f"ConnectionError: http://alice:{PASSWORD}@mlflow.example")
    assert printed == ["trial FAILED: ConnectionError: http://***@mlflow.example"]
