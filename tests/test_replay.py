"""evrecorder-replay: audio loading, the platform's messages, pacing, and calls over real sockets."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import wave

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import task
from twisted.internet.endpoints import serverFromString

from evrecorder import g711, replay
from evrecorder.replay import (
    AGENT,
    CALLER,
    AudioError,
    FloodPacer,
    RealtimePacer,
    ReplayOptions,
    exit_status,
    frames_for,
    load_audio,
)


def the_reactor():
    from twisted.internet import reactor

    return reactor


# -- audio files ---------------------------------------------------------------


def samples(n: int, seed: int) -> list[int]:
    """Deterministic 16-bit samples over the whole range, extremes included."""
    rnd = random.Random(seed)
    return [-32768, 32767, 0, -1] + [rnd.randint(-32768, 32767) for _ in range(n - 4)]


def le16(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}h", *values)


def write_pcm_wav(path, channels: list[list[int]], rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(le16([s for frame in zip(*channels) for s in frame]))


def mulaw_wav(channels: list[bytes], rate: int = 8000) -> bytes:
    """A WAVE_FORMAT_MULAW (tag 7) file built by hand: fmt (18 bytes), fact, odd LIST, data."""
    nch = len(channels)
    data = bytes(b for frame in zip(*channels) for b in frame)
    fmt = struct.pack("<HHIIHHH", 7, nch, rate, rate * nch, nch, 8, 0)
    fact = struct.pack("<I", len(channels[0]))
    listing = b"INFOabc"  # odd size: a pad byte follows
    body = (
        b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"fact" + struct.pack("<I", len(fact)) + fact
        + b"LIST" + struct.pack("<I", len(listing)) + listing + b"\0"
        + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_stereo_pcm16_wav_splits_and_encodes(tmp_path):
    """Stereo PCM16: left -> Participant, right -> Conference, each g711-encoded exactly."""
    left, right = samples(1000, 1), samples(1000, 2)
    path = tmp_path / "call.wav"
    write_pcm_wav(path, [left, right])
    audio = load_audio(str(path))
    assert audio == {AGENT: g711.pcm16le_to_ulaw(le16(left)), CALLER: g711.pcm16le_to_ulaw(le16(right))}


def test_mono_pcm16_wav_goes_to_the_chosen_perspective(tmp_path):
    """Mono goes to the agent by default, to the caller or to both when asked."""
    mono = samples(500, 3)
    path = tmp_path / "mono.wav"
    write_pcm_wav(path, [mono])
    encoded = g711.pcm16le_to_ulaw(le16(mono))
    assert load_audio(str(path)) == {AGENT: encoded}
    assert load_audio(str(path), mono_perspective=CALLER) == {CALLER: encoded}
    assert load_audio(str(path), mono_perspective="both") == {AGENT: encoded, CALLER: encoded}


def test_mulaw_wav_bytes_are_sent_unchanged(tmp_path):
    """A format-7 mu-law WAV is split per channel with its bytes untouched (0x00 included)."""
    left = bytes(range(256)) * 3
    right = bytes(reversed(range(256))) * 3
    path = tmp_path / "mulaw.wav"
    path.write_bytes(mulaw_wav([left, right]))
    assert load_audio(str(path)) == {AGENT: left, CALLER: right}


def test_mono_mulaw_wav(tmp_path):
    """A mono format-7 WAV is the agent's bytes as they are."""
    mono = bytes(range(256))
    path = tmp_path / "mono-mulaw.wav"
    path.write_bytes(mulaw_wav([mono]))
    assert load_audio(str(path)) == {AGENT: mono}


def test_raw_mulaw_by_extension_or_flag(tmp_path):
    """Raw mu-law (.ulaw name, or raw=True for any name) is 8 kHz mono, bytes as they are."""
    data = bytes(range(256)) * 2
    (tmp_path / "a.ulaw").write_bytes(data)
    (tmp_path / "a.bin").write_bytes(data)
    assert load_audio(str(tmp_path / "a.ulaw")) == {AGENT: data}
    assert load_audio(str(tmp_path / "a.bin"), raw=True, mono_perspective="both") == {AGENT: data, CALLER: data}


def test_wrong_sample_rate_is_refused(tmp_path):
    """A 16 kHz WAV is refused with a message naming both rates (no resampling)."""
    path = tmp_path / "wide.wav"
    write_pcm_wav(path, [samples(100, 4)], rate=16000)
    with pytest.raises(AudioError, match=r"16000 Hz.*8000 Hz"):
        load_audio(str(path))
    mulaw16k = tmp_path / "wide-mulaw.wav"
    mulaw16k.write_bytes(mulaw_wav([b"\xff" * 100], rate=16000))
    with pytest.raises(AudioError, match="16000 Hz"):
        load_audio(str(mulaw16k))


def test_unusable_files_are_refused(tmp_path):
    """Missing file, non-WAV bytes and 8-bit PCM each give an AudioError sentence."""
    with pytest.raises(AudioError, match="cannot read"):
        load_audio(str(tmp_path / "missing.wav"))
    (tmp_path / "text.wav").write_bytes(b"hello, not audio")
    with pytest.raises(AudioError, match="not a WAV file"):
        load_audio(str(tmp_path / "text.wav"))
    with wave.open(str(tmp_path / "8bit.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 100)
    with pytest.raises(AudioError, match="8-bit PCM"):
        load_audio(str(tmp_path / "8bit.wav"))


# -- messages ------------------------------------------------------------------


def test_media_frames_alternate_with_sequence_ids_and_sizes():
    """160-byte frames (last shorter), ids from "1" per perspective, agent n before caller n."""
    agent, caller = bytes(range(200)) * 2, bytes(range(55, 255)) * 2  # 400 bytes each
    msgs = list(frames_for({CALLER: caller, AGENT: agent}))
    assert [(m["event"], m["perspective"], m["sequenceId"]) for m in msgs] == [
        ("Media", AGENT, "1"), ("Media", CALLER, "1"),
        ("Media", AGENT, "2"), ("Media", CALLER, "2"),
        ("Media", AGENT, "3"), ("Media", CALLER, "3"),
    ]
    sizes = [len(base64.b64decode(m["media"])) for m in msgs]
    assert sizes == [160, 160, 160, 160, 80, 80]
    for p, audio in ((AGENT, agent), (CALLER, caller)):
        assert b"".join(base64.b64decode(m["media"]) for m in msgs if m["perspective"] == p) == audio


def test_mono_frames_only_for_the_agent():
    """Mono audio makes agent frames only, numbered from 1."""
    msgs = list(frames_for({AGENT: b"\xff" * 320}))
    assert [(m["perspective"], m["sequenceId"]) for m in msgs] == [(AGENT, "1"), (AGENT, "2")]


def test_stop_per_perspective_without_perspective_field():
    """One Stop per perspective with media; no perspective field unless asked for."""
    audio = {AGENT: b"\xff" * 16000, CALLER: b"\xff" * 16000}  # 2 s
    stops = replay.stop_messages(audio, "2026-01-14T00:00:00Z")
    assert stops == [{"event": "Stop", "metadata": {"duration": 2, "end_time": "2026-01-14T00:00:00Z"}}] * 2
    assert len(replay.stop_messages({AGENT: b"\xff"}, "x")) == 1
    marked = replay.stop_messages(audio, "x", with_perspective=True)
    assert [s["perspective"] for s in marked] == [AGENT, CALLER]
    assert replay.rfc3339(0) == "1970-01-01T00:00:00Z"


def test_start_and_connected_messages():
    """Start has the documented metadata (numeric ids as numbers); Connected carries a secret only on request."""
    start = replay.start_message("c1", "2", ReplayOptions())
    assert start == {"event": "Start", "metadata": {
        "callId": "c1", "sessionId": 2, "ani": "2223334444", "dnis": "2223335555",
        "accountId": "99990000", "subaccountId": "99990001", "rcAccountId": "123456789",
        "agentId": 123, "productType": "Queue", "productId": 1234,
        "contentType": "audio/x-mulaw", "sampleRateHertz": 8000}}
    assert replay.start_message("c1", "s-7", ReplayOptions())["metadata"]["sessionId"] == "s-7"
    assert replay.connected_message() == {"event": "Connected", "protocol": "AgentSession", "version": "1.0.0"}
    assert replay.connected_message("s3")["secret"] == "s3"


def test_handshake_url_and_headers():
    """The query has the platform's parameters, --query extras win, and the secret goes only where chosen."""
    from urllib.parse import parse_qsl, urlsplit

    opts = ReplayOptions(query=[("productType", "Campaign"), ("x", "1")], secret="s3cr3t")
    url = replay.handshake_url("ws://h:1/path?keep=yes", "c9", opts)
    parts = urlsplit(url)
    assert parts.path == "/path"
    assert dict(parse_qsl(parts.query)) == {
        "keep": "yes", "callId": "c9", "sessionId": "1", "agentId": "123", "accountId": "99990000",
        "ani": "2223334444", "dnis": "2223335555", "productType": "Campaign", "productId": "1234", "x": "1"}
    assert replay.handshake_headers(opts) == {"Authorization": "Bearer s3cr3t"}
    opts.secret_header = "X-Secret"
    assert replay.handshake_headers(opts) == {"X-Secret": "s3cr3t"}
    opts.secret_in = "query"
    assert replay.handshake_headers(opts) == {}
    assert ("secret", "s3cr3t") in parse_qsl(urlsplit(replay.handshake_url("ws://h/", "c", opts)).query)
    assert replay.call_ids(ReplayOptions(call_id="abc", calls=3)) == ["abc-1", "abc-2", "abc-3"]
    assert replay.call_ids(ReplayOptions(call_id="abc")) == ["abc"]


# -- pacing --------------------------------------------------------------------


def test_realtime_pacer_keeps_to_the_start_time():
    """Tick n goes out at start + n*20 ms; a late wake-up sends just what is due, with no drift after."""
    clock = task.Clock()
    clock.advance(1000)
    sent: list[tuple[int, float]] = []
    done = []
    pacer = RealtimePacer(clock, clock.seconds, 20, lambda n: sent.append((n, clock.seconds())) or True,
                          lambda: done.append(clock.seconds()))
    pacer.start()
    assert [n for n, _ in sent] == [0]
    clock.advance(0.02)
    assert [n for n, _ in sent] == [0, 1]
    clock.advance(0.101)  # the reactor was busy: 5 ticks are due now (2..6)
    assert [n for n, _ in sent] == list(range(7))
    assert clock.getDelayedCalls()[0].getTime() == pytest.approx(1000 + 7 * 0.02)
    clock.pump([0.02] * 13)
    assert [n for n, _ in sent] == list(range(20))
    assert sent[-1][1] == pytest.approx(1000 + 19 * 0.02)
    assert done and not clock.getDelayedCalls()


class TurnClock:
    """A reactor stand-in whose callLater(0) calls run on the next turn(), like a real reactor's."""

    def __init__(self):
        self.pending = []

    def callLater(self, delay, f, *args):
        assert delay == 0
        call = task.Clock().callLater(0, f, *args)  # an IDelayedCall to hand back
        self.pending.append(call)
        return call

    def turn(self):
        calls, self.pending = self.pending, []
        for call in calls:
            if call.active():
                call.func(*call.args)


def test_flood_pacer_yields_between_batches_and_obeys_pause():
    """Flood sends one batch per reactor turn, stops as soon as the transport pauses it, resumes after."""
    clock = TurnClock()
    sent: list[int] = []
    done = []

    def send(n):
        sent.append(n)
        if n == 5:  # the transport's buffer filled up during this write
            pacer.pauseProducing()
        return True

    pacer = FloodPacer(clock, 12, send, lambda: done.append(1), batch=4)
    pacer.start()
    assert sent == []
    clock.turn()
    assert sent == [0, 1, 2, 3]
    clock.turn()
    assert sent == [0, 1, 2, 3, 4, 5]
    assert not clock.pending  # paused: nothing scheduled, no buffer built
    pacer.resumeProducing()
    clock.turn()
    assert sent == list(range(10)) and not done
    clock.turn()
    assert sent == list(range(12)) and done == [1] and not clock.pending


# -- end to end over real sockets ---------------------------------------------


class RecordingServerProtocol(WebSocketServerProtocol):
    """Records the handshake and every message; closes after the expected Stops."""

    def onConnect(self, request):
        f = self.factory
        if f.refuse:
            raise ConnectionDeny(f.refuse)
        self.conn = {"headers": dict(request.headers), "params": dict(request.params),
                     "messages": [], "stops": 0}
        f.connections.append(self.conn)

    def onMessage(self, payload, isBinary):
        msg = json.loads(payload)
        self.conn["messages"].append(msg)
        if msg.get("event") == "Stop":
            self.conn["stops"] += 1
            code = self.factory.close_code
            if self.conn["stops"] == self.factory.stops_expected and code:
                # sendClose accepts only 1000 and 3000-4999; a recorder sends 1008 etc.
                self.sendCloseFrame(code=code, reasonUtf8=b"done", isReply=False)


class Server:
    def __init__(self, stops_expected=2, close_code=1000, refuse=None):
        self.factory = WebSocketServerFactory()
        self.factory.protocol = RecordingServerProtocol
        self.factory.setProtocolOptions(allowNullOrigin=True, maxMessagePayloadSize=1 << 20,
                                        maxFramePayloadSize=1 << 20, openHandshakeTimeout=5,
                                        autoPingInterval=0)
        self.factory.connections = []
        self.factory.stops_expected = stops_expected
        self.factory.close_code = close_code
        self.factory.refuse = refuse
        self.port = None

    @property
    def connections(self):
        return self.factory.connections

    async def listen(self, endpoint=None):
        endpoint = endpoint or serverFromString(the_reactor(), "tcp:0:interface=127.0.0.1")
        self.port = await endpoint.listen(self.factory)
        return self

    def url(self, scheme="ws", path="/stream"):
        return f"{scheme}://127.0.0.1:{self.port.getHost().port}{path}"


@pytest_twisted.async_yield_fixture
async def servers():
    """Start test servers; they stop listening at the end."""
    started = []

    async def make(**kw):
        server = await Server(**kw).listen()
        started.append(server)
        return server

    yield make
    for s in started:
        await s.port.stopListening()


def stereo(frames: int) -> dict[str, bytes]:
    """Varied agent/caller mu-law with a short last frame."""
    n = frames * 160 - 37
    return {AGENT: bytes((i * 7) & 0xFF for i in range(n)), CALLER: bytes((i * 13 + 5) & 0xFF for i in range(n))}


def assert_call_received(conn, audio, call_id, session_id="1", secret_field=None):
    """Connected, Start, every frame in order per perspective with the right bytes, Stops last."""
    msgs = conn["messages"]
    connected = {"event": "Connected", "protocol": "AgentSession", "version": "1.0.0"}
    if secret_field is not None:
        connected["secret"] = secret_field
    assert msgs[0] == connected
    assert msgs[1]["event"] == "Start"
    assert msgs[1]["metadata"]["callId"] == call_id
    media = msgs[2:-len(audio)]
    assert all(m["event"] == "Media" for m in media)
    assert [m["perspective"] for m in media] == [p for _ in range(len(media) // len(audio)) for p in audio]
    for p, data in audio.items():
        mine = [m for m in media if m["perspective"] == p]
        assert [m["sequenceId"] for m in mine] == [str(i) for i in range(1, len(mine) + 1)]
        assert b"".join(base64.b64decode(m["media"]) for m in mine) == data
    assert [m["event"] for m in msgs[-len(audio):]] == ["Stop"] * len(audio)
    assert all("perspective" not in m for m in msgs[-len(audio):])


@pytest_twisted.ensureDeferred
async def test_flood_call_with_secret_in_header(servers):
    """A flooded stereo call arrives whole, with the query parameters and the Bearer secret; closed 1000."""
    server = await servers()
    audio = stereo(30)
    opts = ReplayOptions(call_id="call-7", session_id="42", realtime=False, secret="s3cr3t")
    [result] = await replay.replay(the_reactor(), server.url(), audio, opts)
    [conn] = server.connections
    assert_call_received(conn, {AGENT: audio[AGENT], CALLER: audio[CALLER]}, "call-7")
    assert conn["messages"][1]["metadata"]["sessionId"] == 42
    assert conn["headers"]["authorization"] == "Bearer s3cr3t"
    params = {k: v[0] for k, v in conn["params"].items()}
    assert params == {"callId": "call-7", "sessionId": "42", "agentId": "123", "accountId": "99990000",
                      "ani": "2223334444", "dnis": "2223335555", "productType": "Queue", "productId": "1234"}
    assert result.ok and result.closed_by == "server" and result.close_code == 1000
    assert result.frames == {AGENT: 30, CALLER: 30} and result.stops == 2 and result.complete
    assert result.media_bytes == 2 * len(audio[AGENT])
    assert exit_status([result]) == 0


@pytest_twisted.ensureDeferred
async def test_secret_in_query(servers):
    """--secret-in query: a secret= parameter, no Authorization header, nothing in Connected."""
    server = await servers(stops_expected=1)
    audio = {AGENT: b"\xff" * 500}
    opts = ReplayOptions(call_id="q", realtime=False, secret="s3cr3t", secret_in="query",
                         query=[("extra", "yes")])
    [result] = await replay.replay(the_reactor(), server.url(), audio, opts)
    [conn] = server.connections
    assert conn["params"]["secret"] == ["s3cr3t"] and conn["params"]["extra"] == ["yes"]
    assert "authorization" not in conn["headers"]
    assert_call_received(conn, audio, "q")
    assert result.ok


@pytest_twisted.ensureDeferred
async def test_secret_in_message(servers):
    """--secret-in message: the Connected message carries it, not the handshake."""
    server = await servers(stops_expected=1)
    audio = {CALLER: b"\x00\x7f\x80\xff" * 100}
    opts = ReplayOptions(call_id="m", realtime=False, secret="s3cr3t", secret_in="message")
    [result] = await replay.replay(the_reactor(), server.url(), audio, opts)
    [conn] = server.connections
    assert "secret" not in conn["params"] and "authorization" not in conn["headers"]
    assert_call_received(conn, audio, "m", secret_field="s3cr3t")
    assert result.ok and result.frames == {CALLER: 3}


@pytest_twisted.ensureDeferred
async def test_realtime_call_over_a_socket(servers):
    """The realtime path sends the same complete call (a few frames, so it takes ~0.1 s)."""
    server = await servers()
    audio = stereo(5)
    [result] = await replay.replay(the_reactor(), server.url(), audio, ReplayOptions(call_id="rt"))
    assert_call_received(server.connections[0], audio, "rt")
    assert result.ok and result.elapsed >= 4 * 0.02


@pytest_twisted.ensureDeferred
async def test_concurrent_calls_get_their_own_sockets(servers):
    """--calls 3: three sockets, callIds suffixed -1..-3, each call complete."""
    server = await servers()
    audio = stereo(10)
    opts = ReplayOptions(call_id="load", calls=3, realtime=False)
    results = await replay.replay(the_reactor(), server.url(), audio, opts)
    assert sorted(r.call_id for r in results) == ["load-1", "load-2", "load-3"]
    assert sorted(c["params"]["callId"][0] for c in server.connections) == ["load-1", "load-2", "load-3"]
    for conn in server.connections:
        assert_call_received(conn, audio, conn["params"]["callId"][0])
    assert all(r.ok for r in results)


@pytest_twisted.ensureDeferred
async def test_refused_handshake_reports_the_status(servers):
    """A 403 at the handshake: the result says refused with 403, nothing was sent, exit status 1."""
    server = await servers(refuse=403)
    [result] = await replay.replay(the_reactor(), server.url(), stereo(3), ReplayOptions(realtime=False))
    assert result.refused and result.http_status == 403
    assert result.frames == {AGENT: 0, CALLER: 0} and not result.ok
    assert exit_status([result]) == 1
    assert "handshake refused: HTTP 403" in replay.format_result(result)


@pytest_twisted.ensureDeferred
async def test_other_close_code_fails(servers):
    """A server closing with 1011 is a failed call (exit status 1), its code and reason reported."""
    server = await servers(close_code=1011)
    [result] = await replay.replay(the_reactor(), server.url(), stereo(3), ReplayOptions(realtime=False))
    assert result.closed_by == "server" and result.close_code == 1011 and result.close_reason == "done"
    assert not result.ok and exit_status([result]) == 1
    assert "1011" in replay.format_result(result)


@pytest_twisted.ensureDeferred
async def test_silent_server_is_closed_by_us_after_the_timeout(servers):
    """A server that never closes: we close with 1000 after --close-timeout; accepted, so still ok."""
    server = await servers(close_code=None)
    opts = ReplayOptions(realtime=False, close_timeout=0.05)
    [result] = await replay.replay(the_reactor(), server.url(), stereo(3), opts)
    assert result.closed_by == "client" and result.complete and result.ok
    assert "closed by us" in replay.format_result(result, 0.05)
    assert server.connections[0]["stops"] == 2


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_a_failed_call():
    """Nothing listening: the call fails with a connection error, not an exception."""
    port = await serverFromString(the_reactor(), "tcp:0:interface=127.0.0.1").listen(
        WebSocketServerFactory())
    url = f"ws://127.0.0.1:{port.getHost().port}/"
    await port.stopListening()
    [result] = await replay.replay(the_reactor(), url, stereo(2), ReplayOptions(realtime=False))
    assert result.error and "connection failed" in result.error and not result.ok


def self_signed(tmp_path) -> str:
    """A key and self-signed certificate for localhost/127.0.0.1 as PEM files; the endpoint options."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return f"privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"


@pytest_twisted.ensureDeferred
async def test_wss_insecure_accepts_a_self_signed_certificate(tmp_path):
    """wss:// with --insecure streams to a self-signed server; without it the certificate is rejected."""
    server = Server()
    await server.listen(serverFromString(the_reactor(),
                                         f"ssl:0:interface=127.0.0.1:{self_signed(tmp_path)}"))
    try:
        url = server.url("wss")
        [good] = await replay.replay(the_reactor(), url, stereo(3),
                                     ReplayOptions(realtime=False, insecure=True))
        [bad] = await replay.replay(the_reactor(), url, stereo(3), ReplayOptions(realtime=False))
    finally:
        await server.port.stopListening()
    assert good.ok and good.frames == {AGENT: 3, CALLER: 3}
    assert_call_received(server.connections[0], stereo(3), good.call_id)
    assert not bad.ok and bad.error and "certificate" in bad.error
    assert len(server.connections) == 1


# -- the command ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_run_prints_a_line_per_call_and_exits_1_on_refusal(servers, tmp_path):
    """The command prints the refusal with its HTTP status, a summary, and returns exit status 1."""
    server = await servers(refuse=403)
    path = tmp_path / "call.wav"
    write_pcm_wav(path, [samples(400, 1), samples(400, 2)])
    out, err = io.StringIO(), io.StringIO()
    status = await replay.run(the_reactor(), [str(path), server.url(), "--flood", "--secret", "s3cr3t"],
                              out=out, err=err)
    assert status == 1
    lines = out.getvalue().splitlines()
    assert "HTTP 403" in lines[0] and lines[1].startswith("1 call(s)")
    assert "s3cr3t" not in out.getvalue() + err.getvalue()


@pytest_twisted.ensureDeferred
async def test_run_succeeds_with_exit_status_0(servers, tmp_path):
    """A good call: one line with callId, sessionId, frames per perspective and close code; exit 0."""
    server = await servers()
    path = tmp_path / "call.wav"
    write_pcm_wav(path, [samples(400, 1), samples(400, 2)])
    out = io.StringIO()
    status = await replay.run(the_reactor(), [str(path), server.url(), "--flood", "--call-id", "cli",
                                              "--session-id", "5"], out=out)
    assert status == 0
    line = out.getvalue().splitlines()[0]
    assert line.startswith("callId cli sessionId 5:")
    assert "Participant 3, Conference 3 frames, 800 bytes" in line
    assert "closed by the server: 1000" in line


@pytest_twisted.ensureDeferred
async def test_run_usage_errors_exit_2(tmp_path):
    """Wrong sample rate, unreadable file or a non-WebSocket URL: a message on stderr and status 2."""
    path = tmp_path / "wide.wav"
    write_pcm_wav(path, [samples(100, 1)], rate=16000)
    for argv, expected in (([str(path), "ws://127.0.0.1:1/"], "16000 Hz"),
                           ([str(tmp_path / "nope.wav"), "ws://127.0.0.1:1/"], "cannot read"),
                           ([str(path), "http://127.0.0.1:1/"], "ws:// or wss://")):
        err = io.StringIO()
        assert await replay.run(the_reactor(), argv, out=io.StringIO(), err=err) == 2
        assert expected in err.getvalue()
