"""Which recorder process owns a call, when several share one spool.

With ``--reuse-port`` the kernel spreads sockets over the processes, so a
call whose perspectives come on two sockets (or that reconnects) can reach a
process other than the one recording it.  One call must stay one recording,
so the first process to see a call *claims* it, and the others relay what
they receive to it (:mod:`evrecorder.relay`).

A claim is a file ``<spool>/owners/<digest of callId, sessionId>`` holding the
owner's relay address, locked (``flock``) by the owner for as long as the call
runs.  It is published whole with ``link()``, so nobody ever reads a claim
half written.  The kernel drops the lock when the owner dies: a claim whose
lock can be taken is stale, and the taker removes it and claims anew.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from dataclasses import dataclass

#: Attempts at claiming before giving up (each loses a race to a sibling).
_ATTEMPTS = 5


@dataclass
class Claim:
    """The outcome of :meth:`CallOwners.claim`.

    ``owned``: this process owns the call (``release()`` when it ends).
    Otherwise ``address`` is the owner's relay address (``None``: unknown,
    the owner relays nothing).
    """

    owned: bool
    address: str | None = None
    _path: str | None = None
    _fd: int | None = None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self._path)  # still locked: nobody takes it meanwhile
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it is still the file open (and locked) as ``fd``."""
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


class CallOwners:
    """Claims on calls, in ``<spool>/owners``."""

    def __init__(self, root: str, address: str | None):
        self.dir = os.path.join(root, "owners")
        self.address = address or ""

    def prepare(self) -> None:
        """Make the directory; clear claims and claim drafts whose process died."""
        os.makedirs(self.dir, exist_ok=True)
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except (FileNotFoundError, IsADirectoryError):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            else:
                _unlink_if_same(path, fd)
            finally:
                os.close(fd)

    def path_of(self, call_id: str, session_id: str, dialog: bool = False) -> str:
        """The claim's path; a gRPC dialog's ids are (account id, dialog id)."""
        if dialog:
            # Byte 0xFF never occurs in UTF-8, so no WebSocket call's ids give
            # these bytes; the length keeps (account, dialog) pairs apart.
            account = call_id.encode("utf-8", "surrogatepass")
            data = (b"\xffgrpc" + len(account).to_bytes(8, "big") + account
                    + session_id.encode("utf-8", "surrogatepass"))
        else:
            data = f"{call_id}\0{session_id}".encode("utf-8", "surrogatepass")
        return os.path.join(self.dir, hashlib.sha256(data).hexdigest()[:40])

    def claimed(self, call_id: str, session_id: str) -> bool:
        """Whether a live process holds a claim on the call (a dead one's does not count)."""
        try:
            fd = os.open(self.path_of(call_id, session_id), os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def claim(self, call_id: str, session_id: str, dialog: bool = False) -> Claim:
        """Claim the call (or, ``dialog``, the gRPC dialog of account ``call_id``
        and dialog ``session_id``) for this process, or say who has it."""
        path = self.path_of(call_id, session_id, dialog)
        for _ in range(_ATTEMPTS):
            fd = self._publish(path)
            if fd is not None:
                return Claim(True, self.address, path, fd)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Held: the owner is alive.  It wrote the file before
                # publishing it, so the address is whole.
                address = os.read(fd, 4096).decode("utf-8", "replace")
                os.close(fd)
                return Claim(False, address or None)
            # Not held: the owner died (or is releasing it).  Remove it, if it
            # is still the file at that path, and claim anew.
            try:
                _unlink_if_same(path, fd)
            finally:
                os.close(fd)
        # Siblings kept winning races on this one call: record it here anyway.
        return Claim(True, self.address)

    def _publish(self, path: str) -> int | None:
        """Create the claim file whole and locked; None if one exists."""
        fd, tmp = tempfile.mkstemp(prefix=".claim-", dir=self.dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, self.address.encode("utf-8"))
            # FileNotFoundError: a starting sibling cleared the draft before it
            # was locked (prepare()); the caller tries again.
            os.link(tmp, path)
            return fd
        except (FileExistsError, FileNotFoundError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
