"""The error tree (as h11 and httpcore): one base, protocol errors split by who broke the rules.

- ``RemoteProtocolError``: the peer sent something invalid.  It ends that connection and nothing
  else; the per-connection handler logs its one-line message and closes.
- ``LocalProtocolError``: our own code tried to send something the protocol does not allow
  (a bug on this side, or a message too large for the negotiated frame size).
"""

from __future__ import annotations


class HydraTrioError(Exception):
    """Base of every error hydra-trio raises on purpose."""


class ProtocolError(HydraTrioError):
    """The wire protocol's rules were broken."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection must be closed."""


class IncompatibleVersionError(HydraTrioError):
    """The peer speaks a protocol version this side cannot talk to."""
