"""An operator's first hour: the README's commands, --version, listeners that cannot
start, quiet and journald-ready logs, Prometheus conventions, the HTTP surface, and
evrecorder-replay's TLS and terminal manners."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.python import usage

from evrecorder import __version__
from evrecorder.tap import Options
from test_process import REPO, TWISTD, free_port, listening, until
from test_replay import stereo
from test_tls import make_certificate

README = Path(REPO) / "README.rst"


def reactor():
    from twisted.internet import reactor as r

    return r


# -- the README ------------------------------------------------------------------

def literal_block_after(text: str, intro: str) -> str:
    """The first line of the ``::`` literal block that follows the paragraph ``intro`` starts."""
    at = text.index(intro)
    block = text[text.index("::\n", at) + 3:]
    return next(line.strip() for line in block.splitlines() if line.strip())


def test_readme_commands_use_a_venv_and_ci_runs_the_test_command_verbatim():
    """Both README commands make and use a virtual environment; .ci/run runs the test one as written."""
    text = README.read_text()
    run = literal_block_after(text, "Install and run the recorder on its defaults")
    test = literal_block_after(text, "Install and run the tests")
    for command in (run, test):
        words = shlex.split(command)
        assert words[:4] == ["python3", "-m", "venv", ".venv"], command
        # Nothing goes into the system Python (externally-managed-environment on Debian 12).
        assert "pip" not in [w for w in words if not w.startswith(".venv/")], command
        assert not re.search(r"(^|&&\s*)(python3 -m pip|pip3?) ", command), command
    assert ".venv/bin/pip install ." in run and run.endswith(".venv/bin/twistd -n evrecorder")
    assert ".venv/bin/pip install '.[test]'" in test and test.endswith(".venv/bin/python -m pytest -q")
    assert "apt-get install python3-venv" in " ".join(text[:text.index(run)].split())
    ci = (Path(REPO) / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run the README's test command verbatim"
    assert ci.index(test) == len(ci) - 1  # and last: its status is CI's


def options_of(cls) -> set[str]:
    """Every option name twistd evrecorder takes: parameters, flags and opt_ methods."""
    names = {p[0] for p in cls.optParameters} | {f[0] for f in cls.optFlags}
    names |= {m[4:].replace("_", "-") for m in dir(cls)
              if m.startswith("opt_") and getattr(cls, m) is not getattr(usage.Options, m, None)}
    return names


def test_readme_lists_every_option():
    """Each option of twistd evrecorder appears in README.rst's options table."""
    text = README.read_text()
    table = text[text.index("``twistd [-n] evrecorder [options]``"):text.index("Archive layout\n")]
    assert {"metrics", "max-calls", "ready-max-queue-age", "log-phone-numbers", "version",
            "listen"} <= options_of(Options)
    missing = sorted(n for n in options_of(Options) if f"``--{n}" not in table)
    assert not missing, f"not in README.rst's options table: {missing}"


def test_readme_renders_without_warnings():
    """README.rst is valid reStructuredText: docutils reports nothing, not even an info."""
    import docutils.core

    warnings = io.StringIO()
    docutils.core.publish_doctree(
        README.read_text(), source_path=str(README),
        settings_overrides={"warning_stream": warnings, "report_level": 1, "halt_level": 5},
    )
    assert warnings.getvalue() == ""


def test_readme_per_instance_metrics_port_is_valid_for_every_instance():
    """The template's per-instance --metrics example gives each README instance a usable port."""
    text = README.read_text()
    [example] = re.findall(r'Environment="EVRECORDER_INSTANCE_OPTS=([^"]+)"', text)
    instances = re.findall(r"evrecorder@(\w+)\.service", text)
    assert instances and "%i" in example
    ports = set()
    for instance in instances:
        argv = shlex.split(example.replace("%i", instance))
        options = Options()
        options.parseOptions(argv)  # parses each endpoint: a port out of range would not bind
        [spec] = options["metrics"]
        port = int(spec.split(":")[1])
        assert 1024 <= port <= 65535, spec  # the unit has no capability for a low port
        ports.add(port)
    assert len(ports) == len(instances)  # each process its own
    unit = (Path(REPO) / "systemd" / "evrecorder@.service").read_text()
    assert example in unit  # the unit's comment gives the same example


# -- versions ----------------------------------------------------------------------

def checkout_env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO)


def test_twistd_evrecorder_version():
    """`twistd evrecorder --version` prints evrecorder's version; --help shows the option."""
    out = subprocess.run(TWISTD + ["evrecorder", "--version"], env=checkout_env(),
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, f"evrecorder {__version__}\n"), out.stderr
    usage_text = subprocess.run(TWISTD + ["evrecorder", "--help"], env=checkout_env(),
                                capture_output=True, text=True, timeout=60).stdout
    assert "--version" in usage_text and "evrecorder's version" in usage_text


def test_replay_version():
    """`evrecorder-replay --version` prints evrecorder's version."""
    out = subprocess.run([sys.executable, "-m", "evrecorder.replay", "--version"],
                         env=checkout_env(), capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, f"evrecorder-replay {__version__}\n"), out.stderr


# -- a listener that cannot start ------------------------------------------------------

@pytest.mark.parametrize("case", ["in use", "out of range", "missing certificate"])
def test_listener_that_cannot_start_is_one_sentence(tmp_path, case):
    """A port in use, a port out of range, a missing certificate: one sentence, exit 1, no traceback."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    spec, sentence = {
        "in use": (f"tcp:{port}:interface=127.0.0.1",
                   f"cannot listen on tcp:{port}:interface=127.0.0.1: Couldn't listen on "
                   f"127.0.0.1:{port}: [Errno 98] Address already in use."),
        "out of range": ("tcp:99999:interface=127.0.0.1",
                         "cannot listen on tcp:99999:interface=127.0.0.1: bind(): port must "
                         "be 0-65535."),
        "missing certificate": (
            f"ssl:0:privateKey={tmp_path}/key.pem",
            f"--listen ssl:0:privateKey={tmp_path}/key.pem: the private key file "
            f"{tmp_path}/key.pem cannot be read: No such file or directory."),
    }[case]
    with busy:
        out = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "evrecorder", "--listen", spec,
                      "--spool", str(tmp_path / "spool"), "--archive", str(tmp_path / "a")],
            cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=60,
        )
    said = out.stdout + out.stderr
    assert out.returncode == 1, said
    assert sentence in said
    assert "Traceback" not in said
    assert "Usage:" not in said  # an environment problem, not a usage mistake


def test_listener_sentence_carries_the_journal_priority_under_systemd(tmp_path):
    """With standard error on the journal (JOURNAL_STREAM), the sentence is filed as an error."""
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        out = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "evrecorder", "--listen",
                      f"ssl:0:privateKey={tmp_path}/key.pem"],
            cwd=tmp_path, env=dict(checkout_env(), JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"),
            stdout=subprocess.DEVNULL, stderr=err, timeout=60,
        )
    assert out.returncode == 1
    assert err_path.read_text() == (f"<3>evrecorder: --listen ssl:0:privateKey={tmp_path}/key.pem: "
                                    f"the private key file {tmp_path}/key.pem cannot be read: "
                                    "No such file or directory.\n")


# -- logs, metrics and the HTTP surface of a real twistd --------------------------------

def http_get(port: int, path: str, headers: dict | None = None):
    """(status, headers, body) of a plain HTTP/1.1 GET, any status."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def raw_exchange(port: int, data: bytes, head_only: bool = False) -> bytes:
    """Send ``data``; read until the server closes (or 5 s), or to the end of the head."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
                if head_only and b"\r\n\r\n" in got:
                    break
        except (TimeoutError, ConnectionError):
            pass
        return got


def upgrade_request(headers: str = "") -> bytes:
    return (
        "GET /?callId=c1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    ).encode()


def client_hello() -> bytes:
    """The first bytes a TLS client sends (a ClientHello), from Python's own ssl."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_running_recorder_logs_for_operators(tmp_path):
    """A real twistd: one warning per refusal, TLS mistakes warned, no noise, <N> priorities, 426."""
    key, cert = make_certificate(tmp_path)
    ws_port, wss_port, metrics_port = free_port(), free_port(), free_port()
    log_path = tmp_path / "twistd.log"
    env = dict(checkout_env(), AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}",
               AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="eu-west-1")
    env.pop("AWS_ENDPOINT_URL", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "--logger", "evrecorder.logs.journald_observer",
                      "evrecorder", "--secret", "right",
                      "--listen", f"tcp:{ws_port}:interface=127.0.0.1",
                      "--listen", f"ssl:{wss_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
                      "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1",
                      "--spool", str(tmp_path / "spool"), "--archive", "s3://evr-bucket/calls"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not all(listening(p) for p in (ws_port, wss_port, metrics_port)):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)

        # A wrong secret: 403, and one line.
        answer = raw_exchange(ws_port, upgrade_request("Authorization: Bearer wrong\r\n"))
        assert answer.startswith(b"HTTP/1.1 403 ")
        # A handshake Autobahn refuses (no Sec-WebSocket-Key): 400, and one line too.
        broken = upgrade_request().replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"")
        assert raw_exchange(ws_port, broken).startswith(b"HTTP/1.1 400 ")
        # A plain GET (a browser, a probe): 426 in a line of text, no HTML, no Server header.
        status, headers, body = http_get(ws_port, "/?redirect=https%3A%2F%2Fexample.com")
        assert status == 426 and headers["Upgrade"] == "websocket"
        assert "<html" not in body.lower() and "WebSocket" in body
        assert "Server" not in headers
        # The handshake response names no library either.
        opened = raw_exchange(ws_port, upgrade_request("Authorization: Bearer right\r\n"),
                              head_only=True)
        assert opened.startswith(b"HTTP/1.1 101 ") and b"\r\nserver:" not in opened.lower()
        # wss:// to the plain port is answered at once, not after the handshake timeout.
        started = time.monotonic()
        assert raw_exchange(ws_port, client_hello()).startswith(b"HTTP/1.1 400 ")
        assert time.monotonic() - started < 2
        # Plain text to the TLS port: the client's mistake.
        raw_exchange(wss_port, upgrade_request())
        # Metrics: conventions, and nothing logged for the scrape.
        status, headers, metrics = http_get(metrics_port, "/metrics")
        assert status == 200 and "Server" not in headers
        assert f'evrecorder_build_info{{version="{__version__}"}} 1.0' in metrics
        assert "process_cpu_seconds_total" in metrics and "process_open_fds" in metrics
        assert "_created" not in metrics
        time.sleep(0.5)  # let the last lines reach the log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    lines = log_path.read_text().splitlines()
    text = "\n".join(lines)
    assert all(re.match(r"<[0-7]>\[", line) for line in lines), text  # journald reads each
    refusals = [line for line in lines if "wrong" in line or "forbidden" in line]
    assert refusals == [next(line for line in lines if "refused: wrong secret" in line)], text
    assert refusals[0].startswith("<4>[evrecorder.protocol#warn] handshake from ")
    [broken_line] = [line for line in lines if "Sec-WebSocket-Key" in line]
    assert re.match(r"<4>\[evrecorder.protocol#warn\] handshake from tcp4:127.0.0.1:\d+ refused "
                    r"with 400: ", broken_line), broken_line
    [plain_tls] = [line for line in lines if "on a plain ws:// listener" in line]
    assert plain_tls.startswith("<4>")
    [tls_mistake] = [line for line in lines if "http request" in line]
    assert tls_mistake.startswith("<4>[evrecorder.protocol#warn] TLS with ")
    assert "use wss://" in tls_mistake
    assert not [line for line in lines if line.startswith(("<3>", "<2>", "<1>", "<0>"))
                and "S3" not in line and "evr-bucket" not in line], text
    for noise in ("Starting factory", "Stopping factory", "relay", "Relay", "GET /metrics",
                  "dropping connection", "failing WebSocket"):
        assert noise not in text, noise
    # The start-up line names the version and the S3 endpoint from AWS_ENDPOINT_URL_S3.
    [start] = [line for line in lines if "recording to" in line]
    assert start.startswith(f"<6>[evrecorder.service#info] evrecorder {__version__} recording "
                            f"to s3://evr-bucket/calls at {env['AWS_ENDPOINT_URL_S3']} ")


def test_relay_socket_lines_appear_with_reuse_port(tmp_path):
    """With --reuse-port (several processes share the spool) the relay socket is logged."""
    port = free_port()
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "evrecorder", "--reuse-port",
                      "--listen", f"tcp:{port}:interface=127.0.0.1",
                      "--spool", str(tmp_path / "spool"), "--archive", str(tmp_path / "a")],
            cwd=tmp_path, env=checkout_env(), stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while b"RelayServerFactory starting on" not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert "Starting factory" not in log_path.read_text()


def test_journald_prefix_per_level_and_per_traceback_line():
    """Each line starts with its syslog priority, a traceback's lines too; empty events vanish."""
    from twisted.logger import Logger, LogLevel

    from evrecorder.logs import journald_observer

    out = io.StringIO()
    log = Logger(namespace="evrecorder.test", observer=journald_observer(out))
    log.critical("c")
    log.error("e {n}", n=1)
    log.warn("w")
    log.info("i")
    log.debug("d")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("broke")
    log.emit(LogLevel.info, "")
    lines = out.getvalue().splitlines()
    assert lines[:5] == [
        "<2>[evrecorder.test#critical] c", "<3>[evrecorder.test#error] e 1",
        "<4>[evrecorder.test#warn] w", "<6>[evrecorder.test#info] i",
        "<7>[evrecorder.test#debug] d",
    ]
    failure = lines[5:]
    assert failure[0] == "<2>[evrecorder.test#critical] broke"
    assert len(failure) > 3 and all(line.startswith("<2>[evrecorder.test#critical] ")
                                    for line in failure)
    assert failure[-1].endswith("ZeroDivisionError: division by zero")


def test_quieted_port_lines_leave_nothing_in_either_observer():
    """A port's legacy "starting on" line, quieted, writes nothing in the journald or JSON format."""
    from twisted.logger import globalLogPublisher
    from twisted.python import log as legacy_log

    from evrecorder.logs import journald_observer, json_observer
    from evrecorder.service import _quietly

    journal, jsonl = io.StringIO(), io.StringIO()
    observers = [journald_observer(journal), json_observer(jsonl)]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    try:
        _quietly(legacy_log.msg, "RelayServerFactory starting on '/spool/relay/1.sock'")
        legacy_log.msg("MetricsSite starting on 9100")
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    assert journal.getvalue() == "<6>[-] MetricsSite starting on 9100\n"
    assert [line for line in jsonl.getvalue().splitlines() if "starting on" in line] == \
        [jsonl.getvalue().strip()]
    assert "relay" not in jsonl.getvalue()


def test_units_run_twistd_with_the_journald_observer(tmp_path, monkeypatch):
    """Both service units pass --logger evrecorder.logs.journald_observer, which twistd can load."""
    from evrecorder.logs import journald_observer
    from test_systemd import parse_twistd, service_argv

    argv, _ = service_argv(tmp_path)
    config = parse_twistd(argv[1:], monkeypatch, tmp_path)
    assert config["logger"] is journald_observer  # twistd resolved the name
    template = (Path(REPO) / "systemd" / "evrecorder@.service").read_text()
    assert "--logger evrecorder.logs.journald_observer evrecorder" in " ".join(
        template.replace("\\\n", " ").split())


@pytest_twisted.ensureDeferred
async def test_tls_listener_accepts_clients_that_offer_alpn(recorder_factory, tmp_path):
    """A TLS client offering ALPN (h2, http/1.1) gets http/1.1 and its WebSocket handshake."""
    key, cert = make_certificate(tmp_path)
    rec = await recorder_factory(listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")

    def handshake() -> tuple[str | None, bytes]:
        ctx = ssl.create_default_context(cafile=cert)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", rec.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(upgrade_request())
                return tls.selected_alpn_protocol(), tls.recv(4096)

    protocol, answer = await deferToThread(handshake)
    assert protocol == "http/1.1"
    assert answer.startswith(b"HTTP/1.1 101 ")


# -- evrecorder-replay -----------------------------------------------------------------

def write_ulaw(path: Path, seconds: float) -> Path:
    path.write_bytes(stereo(int(seconds * 50))["Participant"])
    return path


@pytest_twisted.ensureDeferred
async def test_replay_cafile_trusts_a_private_ca_and_says_which_option_helps(
        recorder_factory, tmp_path):
    """--cafile makes a private certificate trusted; without it the failure names --cafile."""
    from evrecorder import replay

    key, cert = make_certificate(tmp_path)
    rec = await recorder_factory(listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    audio = write_ulaw(tmp_path / "a.ulaw", 0.2)
    url = f"wss://localhost:{rec.port}/"
    out = io.StringIO()
    assert await replay.run(reactor(), [str(audio), url, "--flood", "--cafile", cert],
                            out=out) == 0, out.getvalue()
    out = io.StringIO()
    assert await replay.run(reactor(), [str(audio), url, "--flood"], out=out) == 1
    assert "is not trusted" in out.getvalue() and "--cafile" in out.getvalue()
    assert "--insecure" in out.getvalue()
    # Trusted, but for another name: the line says so.
    rec2 = await recorder_factory(subdir="any", listen=f"ssl:0:privateKey={key}:certKey={cert}")
    out = io.StringIO()
    assert await replay.run(reactor(), [str(audio), f"wss://127.0.0.2:{rec2.port}/", "--flood",
                                        "--cafile", cert], out=out) == 1
    assert "is not for 127.0.0.2" in out.getvalue(), out.getvalue()
    err = io.StringIO()
    assert await replay.run(reactor(), [str(audio), url, "--cafile", str(audio)], err=err) == 2
    assert "holds no PEM certificate" in err.getvalue()


@pytest_twisted.ensureDeferred
async def test_replay_wrong_scheme_fails_fast_with_a_hint(recorder_factory, tmp_path):
    """wss:// to a plain port and ws:// to a TLS port fail at once, saying which scheme to use."""
    from evrecorder import replay

    key, cert = make_certificate(tmp_path)
    plain = await recorder_factory(subdir="plain")
    tls = await recorder_factory(
        subdir="tls", listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    audio = write_ulaw(tmp_path / "a.ulaw", 0.2)
    for url, hint in ((f"wss://127.0.0.1:{plain.port}/", "does not speak TLS"),
                      (f"ws://127.0.0.1:{tls.port}/", "then use wss://")):
        out = io.StringIO()
        started = time.monotonic()
        status = await replay.run(reactor(), [str(audio), url, "--flood", "--insecure"], out=out)
        assert status == 1 and hint in out.getvalue(), out.getvalue()
        assert time.monotonic() - started < 3  # not the 10 s handshake timeout


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest_twisted.ensureDeferred
async def test_replay_progress_line_on_a_terminal_only(recorder_factory, tmp_path):
    """A realtime replay shows elapsed / total and frames sent on a terminal, nothing otherwise."""
    from evrecorder import replay

    rec = await recorder_factory()
    audio = write_ulaw(tmp_path / "a.ulaw", 1.2)
    url = f"ws://127.0.0.1:{rec.port}/"
    out, err = io.StringIO(), Terminal()
    assert await replay.run(reactor(), [str(audio), url, "--close-timeout", "2"],
                            out=out, err=err) == 0, out.getvalue()
    shown = [part for part in err.getvalue().split("\r\x1b[K") if part]
    assert len(shown) >= 2, err.getvalue()
    assert all(re.fullmatch(r" *\d+\.\d / 1\.2 s, \d+ frames sent", part) for part in shown)
    counts = [int(part.split(", ")[1].split()[0]) for part in shown]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert err.getvalue().endswith("\r\x1b[K")  # cleared before the result lines
    assert "\r" not in out.getvalue()
    quiet = io.StringIO()
    assert await replay.run(reactor(), [str(audio), url], out=io.StringIO(), err=quiet) == 0
    assert quiet.getvalue() == ""


@pytest_twisted.ensureDeferred
async def test_replay_ctrl_c_is_interrupted_by_you(recorder_factory, tmp_path):
    """Ctrl-C ends a replay with "interrupted by you" per call and status 130, no traceback."""
    rec = await recorder_factory()
    audio = write_ulaw(tmp_path / "a.ulaw", 20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "evrecorder.replay", "--calls", "2", "--stagger", "30",
         "--call-id", "ctrl-c", str(audio), f"ws://127.0.0.1:{rec.port}/"],
        env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        await until(lambda: rec.service.registry.calls, what="the first call to start")
        proc.send_signal(signal.SIGINT)
        await until(lambda: proc.poll() is not None, what="the replay to exit")
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    lines = out.splitlines()
    assert sorted(line.split(":")[0] for line in lines[:2]) == [
        "callId ctrl-c-1 sessionId 1", "callId ctrl-c-2 sessionId 1"]
    assert all("interrupted by you" in line for line in lines[:2])
    assert "2 interrupted by you" in lines[2] and "0 failed" in lines[2]
    assert "connection lost" not in out and "Traceback" not in err
