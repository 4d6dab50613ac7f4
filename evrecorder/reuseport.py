"""Listening with ``SO_REUSEPORT``: several recorder processes on one port.

With ``--reuse-port`` every ``tcp:`` and ``ssl:`` listener sets
``SO_REUSEPORT`` before it binds, so several processes (say one per core,
``evrecorder@1``, ``evrecorder@2`` ...) can listen on the same port and the
kernel spreads new connections over them.  The processes share the spool;
calls that reach two of them stay one recording (:mod:`evrecorder.owners`,
:mod:`evrecorder.relay`).

It works through the endpoint's reactor: :class:`ReusePortReactor` is the
real reactor but for ``listenTCP`` and ``listenSSL``, so endpoint strings keep
their meaning and options.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.protocols.tls import TLSMemoryBIOFactory


class _ReusePort(tcp.Port):
    def createInternetSocket(self):
        s = super().createInternetSocket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


class ReusePortReactor:
    """The reactor, with TCP (and TLS over TCP) listeners that set SO_REUSEPORT."""

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        p = _ReusePort(port, factory, backlog, interface, self._reactor)
        p.startListening()
        return p

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        p = self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog,
                           interface)
        p._type = "TLS"
        return p
