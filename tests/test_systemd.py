"""The systemd units in systemd/: they load cleanly, keep their hardening, pass
valid options to twistd, and socket activation hands twistd a socket it records through.

Needs systemd's tools (Debian package ``systemd``: ``systemd-analyze``,
``systemd-socket-activate``), not systemd running as PID 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest

from conftest import need_tool

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SERVICE = UNITS / "evrecorder.service"
SOCKET = UNITS / "evrecorder.socket"
ENV_FILE = UNITS / "evrecorder.env"
SHIPPED_TWISTD = "/opt/evrecorder/bin/twistd"
# twistd of the Python running the tests (python -m twisted is `twist`, not twistd).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def tool(name: str) -> str:
    need_tool(name, package="systemd")  # skips (fails in CI) without it
    return shutil.which(name)


# -- reading the units as systemd does (the subset they use) -------------------

def unit_settings(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file: [(key, value)] in order, continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if pending:
            line, pending = pending + line, ""
        elif not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def specifiers(value: str, state_root: str) -> str:
    """Expand the unit specifiers the units use; any other is an error here."""
    def one(m):
        spec = m.group(1)
        if spec == "%":
            return "%"
        if spec == "S":
            return state_root
        raise AssertionError(f"the test does not know specifier %{spec}")

    return re.sub(r"%(.)", one, value)


def env_file_assignments(text: str) -> dict[str, str]:
    """NAME=value lines of an EnvironmentFile (a quoted value loses its quotes)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f"not NAME=value: {line!r}"
        value = value.strip()
        if value[:1] in ("'", '"'):
            [value] = shlex.split(value)
        out[name] = value
    return out


def expand_command(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart= words with systemd's substitution: ${X} stays one word, a bare $X word
    splits at whitespace (quotes respected) into zero or more words."""
    words = []
    for word in shlex.split(command):
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare:
            words.extend(shlex.split(env.get(bare.group(1), "")))
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                lambda m: env.get(m.group(1), ""), word))
    return words


def service_argv(tmp_path, env_file_text: str = "") -> tuple[list[str], dict[str, str]]:
    """The service's ExecStart argv as systemd would run it, with its state directory and
    credentials directory under tmp_path, and the given environment file."""
    state_root = str(tmp_path / "var-lib")
    service = dict(unit_settings(SERVICE)["Service"])
    env: dict[str, str] = {}
    for key, value in unit_settings(SERVICE)["Service"]:
        if key == "Environment":
            for item in shlex.split(specifiers(value, state_root)):
                name, _, val = item.partition("=")
                env[name] = val
    assert service["EnvironmentFile"] == "-/etc/evrecorder/evrecorder.env"
    env.update(env_file_assignments(env_file_text))  # read after Environment=: it wins
    env["STATE_DIRECTORY"] = os.path.join(state_root, service["StateDirectory"])
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path / "credentials")
    return expand_command(specifiers(service["ExecStart"], state_root), env), env


def parse_twistd(argv: list[str], monkeypatch, tmp_path):
    """twistd's own option parsing of argv, with the checkout's evrecorder plugin and the
    secret in a fake credentials directory, as LoadCredential= provides it."""
    from twisted.scripts.twistd import ServerOptions

    creds = tmp_path / "credentials"
    creds.mkdir(exist_ok=True)
    (creds / "secret").write_text("s3cr3t\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.delenv("EVRECORDER_SECRET", raising=False)
    # Endpoints are parsed at option time, which needs the real key files and
    # the systemd-passed socket; those are exercised by test_tls and by the
    # socket-activation test below. Here: only that the words parse.
    import evrecorder.tap

    monkeypatch.setattr(evrecorder.tap, "_check_endpoint", lambda option, spec: None)
    spec = importlib.util.spec_from_file_location(
        "_evrecorder_plugin", REPO / "twisted" / "plugins" / "evrecorder_plugin.py"
    )
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    config = ServerOptions()
    config._getPlugins = lambda interface: [plugin.evrecorder]
    config.parseOptions(argv)
    return config


def env_examples() -> list[str]:
    """The commented-out EVRECORDER_* examples of the shipped environment file."""
    return [
        line[1:] for line in ENV_FILE.read_text().splitlines()
        if re.match(r"#EVRECORDER_[A-Z_]+=", line)
    ]


# -- systemd-analyze -------------------------------------------------------------

def installed_units(tmp_path) -> Path:
    """Copies of the units with ExecStart pointing at a twistd that exists here."""
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        twistd = Path(shutil.which("twistd") or pytest.fail("no twistd next to the Python"))
    out = tmp_path / "units"
    out.mkdir()
    for unit in (SERVICE, UNITS / "evrecorder@.service"):
        text = unit.read_text()
        assert text.count(SHIPPED_TWISTD) == 1, "ExecStart no longer runs " + SHIPPED_TWISTD
        (out / unit.name).write_text(text.replace(SHIPPED_TWISTD, str(twistd)))
    shutil.copy(SOCKET, out / SOCKET.name)
    return out


def assert_verifies(tmp_path, *units: Path) -> None:
    """systemd-analyze verify loads the units with no error and no warning about them."""
    out = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", "--generators=no",
         *(str(u) for u in units)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=dict(os.environ, SYSTEMD_LOG_COLOR="0", LANG="C.UTF-8"),
    )
    lines = (out.stdout + out.stderr).splitlines()
    # Complaints about the host's own units are not ours to fix; anything else is.
    ours = [
        line for line in lines
        if "evrecorder" in line or str(tmp_path) in line
        or not re.search(r"/lib/systemd/|/etc/systemd/|/run/systemd/", line)
    ]
    assert out.returncode == 0 and not ours, "\n".join(lines)


def test_units_verify_without_warnings(tmp_path):
    """systemd-analyze verify loads both units with no error and no warning about them."""
    units = installed_units(tmp_path)
    assert_verifies(tmp_path, units / SERVICE.name, units / SOCKET.name)


HARDENING = [
    "NoNewPrivileges", "UserOrDynamicUser", "AmbientCapabilities",
    "CapabilityBoundingSet_CAP_SYS_ADMIN", "CapabilityBoundingSet_CAP_NET_ADMIN",
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateUsers",
    "PrivateMounts", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset",
    "RestrictAddressFamilies_AF_PACKET", "RestrictAddressFamilies_AF_NETLINK",
    "RestrictAddressFamilies_OTHER", "RestrictNamespaces_user", "RestrictNamespaces_net",
    "RestrictRealtime", "RestrictSUIDSGID", "RemoveIPC", "LockPersonality", "KeyringMode",
    "SystemCallArchitectures", "SystemCallFilter_privileged", "SystemCallFilter_resources",
    "SystemCallFilter_mount", "SystemCallFilter_module",
]


def test_service_hardening_holds(tmp_path):
    """systemd-analyze security: every hardening setting holds and the exposure stays <= 1.5."""
    units = installed_units(tmp_path)
    analyze = [tool("systemd-analyze"), "security", "--offline=yes"]
    out = subprocess.run(
        analyze + ["--json=short", str(units / SERVICE.name)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    checks = {c["json_field"]: c for c in json.loads(out.stdout)}
    unset = [f for f in HARDENING if f not in checks or not checks[f]["set"]]
    assert not unset, f"hardening lost: {unset}"
    out = subprocess.run(
        analyze + ["--threshold=15", str(units / SERVICE.name)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-400:] + out.stderr


# -- the command line the service runs -------------------------------------------

def test_service_command_line_is_valid_with_defaults(tmp_path, monkeypatch):
    """ExecStart with the unit's defaults and an empty env file is a valid twistd evrecorder run."""
    argv, env = service_argv(tmp_path)
    assert argv[0] == SHIPPED_TWISTD
    config = parse_twistd(argv[1:], monkeypatch, tmp_path)
    state = env["STATE_DIRECTORY"]
    assert (config["nodaemon"], config["pidfile"], config.subCommand) == (True, "", "evrecorder")
    sub = config.subOptions
    assert sub["listen"] == ["tcp:3333"]
    assert sub["spool"] == os.path.join(state, "spool")
    assert sub["archive"] == os.path.join(state, "recordings")
    assert sub["secrets"] == ["s3cr3t"]  # found in $CREDENTIALS_DIRECTORY
    assert sub["drain-timeout"] < float(dict(unit_settings(SERVICE)["Service"])["TimeoutStopSec"])


@pytest.mark.parametrize("example", env_examples())
def test_env_file_examples_are_valid(tmp_path, monkeypatch, example):
    """Each example of evrecorder.env, uncommented, still makes a valid twistd evrecorder run."""
    argv, env = service_argv(tmp_path, example)
    sub = parse_twistd(argv[1:], monkeypatch, tmp_path).subOptions
    name, _, value = example.partition("=")
    if name == "EVRECORDER_LISTEN":
        assert sub["listen"] == [value]
    elif name == "EVRECORDER_ARCHIVE":
        assert sub["archive"] == value
    else:
        assert name == "EVRECORDER_OPTS" and shlex.split(value)[0] in argv


def test_env_file_sets_nothing_by_default():
    """The shipped evrecorder.env only documents: installing it changes no default."""
    assert env_file_assignments(ENV_FILE.read_text()) == {}
    assert {line.partition("=")[0] for line in env_examples()} == {
        "EVRECORDER_LISTEN", "EVRECORDER_ARCHIVE", "EVRECORDER_OPTS"
    }


def test_socket_unit_matches_the_socket_mode_listen_string():
    """The socket's FileDescriptorName and Service= match the socket-mode --listen example."""
    sock = dict(unit_settings(SOCKET)["Socket"])
    assert sock["FileDescriptorName"] == "evrecorder"
    assert sock["Service"] == SERVICE.name
    assert [k for k, _ in unit_settings(SOCKET)["Socket"]].count("ListenStream") == 1
    assert "EVRECORDER_LISTEN=systemd:domain=INET6:name=evrecorder" in env_examples()
    assert "WantedBy" in dict(unit_settings(SOCKET)["Install"])
    assert "WantedBy" in dict(unit_settings(SERVICE)["Install"])


# -- socket activation, for real -------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_call_wav(path: Path, seconds: float = 1.0) -> None:
    """Stereo 8 kHz PCM16: a tone left (agent), another right (caller)."""
    import math

    n = int(8000 * seconds)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"".join(
            struct.pack("<hh", int(8000 * math.sin(i / 8)), int(6000 * math.sin(i / 5)))
            for i in range(n)
        ))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_socket_activation_records_a_call(tmp_path):
    """Under systemd-socket-activate, twistd adopts the named socket and records a call on it."""
    port = free_port()
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "secret").write_text("act-secret\n")
    wav_path = tmp_path / "call.wav"
    write_call_wav(wav_path)
    archive = tmp_path / "archive"
    log_path = tmp_path / "twistd.log"
    # systemd-socket-activate passes only PATH, HOME, TERM and what -E names, then
    # execs the daemon in place once a connection arrives: the pid stays twistd's.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [tool("systemd-socket-activate"), "-l", f"127.0.0.1:{port}",
             "--fdname=evrecorder", "-E", f"PYTHONPATH={REPO}",
             "-E", f"CREDENTIALS_DIRECTORY={creds}",
             *TWISTD, "-n", "--pidfile=", "evrecorder",
             "--listen", "systemd:domain=INET:name=evrecorder",
             "--spool", str(tmp_path / "spool"), "--archive", str(archive),
             "--secret-file", "secret"],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: b"Listening on" in log_path.read_bytes() or proc.poll() is not None,
                 30, "systemd-socket-activate to listen")
        assert proc.poll() is None, log_path.read_text()
        replay = subprocess.run(
            [sys.executable, "-m", "evrecorder.replay", "--flood", "--secret", "act-secret",
             "--connect-timeout", "60", "--call-id", "act-1", str(wav_path),
             f"ws://127.0.0.1:{port}/"],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
            capture_output=True, text=True, timeout=120,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr + log_path.read_text()
        [sidecar_path] = wait_for(lambda: list(archive.rglob("act-1-1.json")), 30, "the sidecar")
        sidecar = json.loads(sidecar_path.read_text())
        assert sidecar["callId"] == "act-1" and sidecar["complete"] is True
        with wave.open(str(sidecar_path.with_suffix(".wav")), "rb") as w:
            assert (w.getnchannels(), w.getframerate()) == (2, 8000)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"twisted.scripts.twistd" in f.read()  # exec'd in place
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    # twistd re-raises SIGTERM after a clean shutdown; systemd counts that as success.
    assert status in (0, -signal.SIGTERM), log_path.read_text()
    assert "Server Shut Down." in log_path.read_text()


# -- evrecorder@.service: several processes ---------------------------------------

TEMPLATE = UNITS / "evrecorder@.service"


def test_template_is_the_service_with_reuse_port():
    """evrecorder@.service differs from evrecorder.service only where it must."""
    plain, template = unit_settings(SERVICE), unit_settings(TEMPLATE)
    assert set(plain) == set(template)
    for section in plain:
        differ = [kv for kv in template[section] if kv not in plain[section]]
        missing = [kv for kv in plain[section] if kv not in template[section]]
        if section == "Service":
            differ = [(k, " ".join(v.split())) for k, v in differ]
        if section == "Unit":
            assert [k for k, _ in differ] == [k for k, _ in missing] == ["Description"]
            assert "%i" in dict(differ)["Description"]
        elif section == "Service":
            assert [k for k, _ in missing] == ["ExecStart"]
            words = dict(missing)["ExecStart"].split()
            at = words.index("$EVRECORDER_OPTS")
            assert differ == [
                ("Environment", "EVRECORDER_INSTANCE_OPTS="),
                ("ExecStart", " ".join(
                    words[:at] + ["--reuse-port", "$EVRECORDER_OPTS", "$EVRECORDER_INSTANCE_OPTS"]
                    + words[at + 1:])),
            ]
        else:
            assert differ == missing == []


def test_template_instance_verifies_and_parses(tmp_path, monkeypatch):
    """An instance loads with no warning, and its command line is a valid twistd run."""
    units = installed_units(tmp_path)
    assert_verifies(tmp_path, units / "evrecorder@1.service")
    argv, _ = service_argv(tmp_path)
    argv = argv[: argv.index("--secret-file") + 2] + ["--reuse-port"] + argv[argv.index("--secret-file") + 2:]
    config = parse_twistd(argv[1:], monkeypatch, tmp_path)
    assert config.subOptions["reuse-port"] == 1
