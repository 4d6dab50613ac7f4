"""The nightly verification units: evrecorder-verify.service and .timer load cleanly, keep
their hardening, and their command line is a valid `evrecorder verify` run that works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_systemd import (
    ENV_FILE, HARDENING, UNITS, assert_verifies, env_file_assignments, expand_command,
    specifiers, tool, unit_settings,
)

VERIFY_SERVICE = UNITS / "evrecorder-verify.service"
VERIFY_TIMER = UNITS / "evrecorder-verify.timer"
SHIPPED_CLI = "/opt/evrecorder/bin/evrecorder"
REPO = Path(__file__).resolve().parent.parent


def installed(tmp_path) -> Path:
    """Copies of the units with ExecStart pointing at an `evrecorder` that exists here."""
    out = tmp_path / "units"
    out.mkdir()
    script = tmp_path / "evrecorder"
    script.write_text(f"#!{sys.executable}\nfrom evrecorder.cli import main\nraise SystemExit(main())\n")
    script.chmod(0o755)
    text = VERIFY_SERVICE.read_text()
    assert text.count(SHIPPED_CLI) == 1, "ExecStart no longer runs " + SHIPPED_CLI
    (out / VERIFY_SERVICE.name).write_text(text.replace(SHIPPED_CLI, str(script)))
    (out / VERIFY_TIMER.name).write_text(VERIFY_TIMER.read_text())
    return out


def verify_argv(env_file_text: str = "") -> list[str]:
    """ExecStart as systemd would run it, with the given environment file."""
    service = unit_settings(VERIFY_SERVICE)["Service"]
    env = {}
    for key, value in service:
        if key == "Environment":
            name, _, val = specifiers(value, "/var/lib").partition("=")
            env[name] = val
    assert dict(service)["EnvironmentFile"] == "-/etc/evrecorder/evrecorder.env"
    env.update(env_file_assignments(env_file_text))
    return expand_command(dict(service)["ExecStart"], env)


def test_verify_units_load_without_warnings(tmp_path):
    """systemd-analyze verify loads the service and its timer with no error or warning."""
    units = installed(tmp_path)
    assert_verifies(tmp_path, units / VERIFY_SERVICE.name, units / VERIFY_TIMER.name)


def test_timer_runs_the_service_nightly():
    """The timer starts evrecorder-verify.service every night, catching up on a missed night."""
    timer = dict(unit_settings(VERIFY_TIMER)["Timer"])
    assert timer["OnCalendar"] == "*-*-* 03:30:00" and timer["Persistent"] == "true"
    assert "Unit" not in timer  # the service of the same name
    assert dict(unit_settings(VERIFY_TIMER)["Install"])["WantedBy"] == "timers.target"
    assert dict(unit_settings(VERIFY_SERVICE)["Service"])["Type"] == "oneshot"


def test_verify_service_hardening_holds(tmp_path):
    """systemd-analyze security: the recorder's hardening holds for the verifier too."""
    units = installed(tmp_path)
    out = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--json=short",
         str(units / VERIFY_SERVICE.name)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    checks = {c["json_field"]: c for c in json.loads(out.stdout)}
    unset = [f for f in HARDENING if f not in checks or not checks[f]["set"]]
    assert not unset, f"hardening lost: {unset}"


def test_verify_command_line_runs(tmp_path):
    """ExecStart with an environment file naming an archive is a verify run that passes on it."""
    archive = tmp_path / "recordings"
    archive.mkdir()
    argv = verify_argv(f"EVRECORDER_ARCHIVE={archive}\n"
                       "EVRECORDER_VERIFY_OPTS=--expect-retention-days 1 --no-progress\n")
    assert argv[0] == SHIPPED_CLI
    assert argv[1:] == ["verify", str(archive), "--since", "2d", "--expect-retention-days", "1",
                        "--no-progress"]
    out = subprocess.run([sys.executable, "-m", "evrecorder.cli", *argv[1:]],
                         env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every recording verifies." in out.stdout


def test_default_archive_matches_the_recorder_service():
    """With no environment file, the verifier checks where evrecorder.service archives."""
    argv = verify_argv()
    assert argv[2] == "/var/lib/evrecorder/recordings"
    recorder = dict(unit_settings(UNITS / "evrecorder.service")["Service"])
    assert recorder["StateDirectory"] == "evrecorder"
    same = [("Environment", "EVRECORDER_ARCHIVE=%S/evrecorder/recordings"),
            ("EnvironmentFile", "-/etc/evrecorder/evrecorder.env"), ("User", "evrecorder")]
    for setting in same:
        assert setting in unit_settings(UNITS / "evrecorder.service")["Service"]
        assert setting in unit_settings(VERIFY_SERVICE)["Service"]
    assert ENV_FILE.exists()
