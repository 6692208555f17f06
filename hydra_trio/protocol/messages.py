"""Message types of the hydra-trio wire protocol.

Theory of operation
-------------------
Every frame body is one msgpack map.  Its ``"type"`` key names the message (the *tag*); the
other keys are the message's fields, by their Python names.  Each message is a frozen attrs
class whose validators are the single place where field shapes are checked: a message built
locally with a wrong field raises ``ValueError`` at construction, and the decoder turns the same
failure on a received frame into ``RemoteProtocolError`` naming the message and the field.

Records (``BuildRef``, ``FileInfo``, ``InputSpec``, ``Limits``) are nested maps without a tag.

Compatibility rules (see docs/protocol.md):

- A field with a default may be missing on the wire; the default applies.  A field without a
  default is required.
- Keys a receiver does not know are ignored, so a minor version may add optional fields.
- Every message about a build carries ``attempt``: the fencing token.  The runner accepts a
  message about a build only for the attempt it currently has assigned to that machine.
- Each message may travel in one direction only (``SENDERS``); a frame in the wrong direction
  is a protocol error.

The module is the protocol's catalogue (every message and record with its validators, in the
order of docs/protocol.md): long because the protocol has that many messages, declarative
throughout, and kept in one file so the doc and the code can be read side by side.
"""

from __future__ import annotations

import enum
import functools
import operator
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs

from hydra_trio.protocol import validators as v
from hydra_trio.protocol.errors import RemoteProtocolError

#: The protocol version this code speaks.  Same major = compatible.
PROTOCOL_VERSION = "1.7"
#: The minor version that added listings in pieces (``InputSpec.listed``, ``ListRequest``,
#: ``ListData``, ``OutputList``, ``Result.listed_outputs``): sent only to peers speaking it.
LISTING_MINOR = 3
#: The minor version that added ``FetchFiles`` (many small input files in one request): sent
#: only to runners speaking it.
FILES_MINOR = 7
#: The most files one ``FetchFiles`` may name, and the most bytes they may hold together (an
#: answer to more is one ``error`` frame).
MAX_FETCH_FILES = 256
MAX_FETCH_FILES_BYTES = 1024 * 1024
#: The most files one ``UploadFiles`` may carry (each a whole file, together at most one
#: ``codec.TRANSFER_FRAME`` of data in the reference builder).
MAX_UPLOAD_FILES = 256
#: The feature a build requires to be given the network (``Assign.network``, 1.5): a builder
#: supports it when its builds have the network (unsandboxed, or ``--sandbox-allow-network``).
NETWORK_FEATURE = "network"


class Role(enum.Enum):
    """Which end of a connection a side is."""

    #: the queue runner: accepts connections, assigns builds.
    RUNNER = "runner"
    #: a builder: dials in, pings, runs builds.
    BUILDER = "builder"


class Phase(enum.Enum):
    """What a running build is doing, as reported by ``Progress``."""

    #: fetching the outputs of the builds it depends on into ``$IN``.
    FETCHING = "fetching"
    #: the command is running.
    BUILDING = "building"
    #: uploading what the command left in ``$OUT``.
    UPLOADING = "uploading"


class ExecutorKind(enum.StrEnum):
    """What runs a build on a builder.  The value is its name on the wire (``Hello.executors``)
    and on the command line (``--executor``)."""

    #: an ``Assign``'s ``command``, run in a fresh directory (a 1.0 builder has only this).
    COMMAND = "command"
    #: an ``Assign``'s ``drv``, realised in a Nix store (1.1).
    NIX = "nix"


class BuildStatus(enum.Enum):
    """Why a build (or one attempt of it) ended."""

    #: exit status 0 and outputs uploaded.
    SUCCESS = "success"
    #: the command exited non-zero (or could not be started).
    BUILD_FAILED = "build-failed"
    #: the wall-clock ``timeout`` passed.
    TIMED_OUT = "timed-out"
    #: no log output for ``maxSilent`` seconds.
    SILENT_TOO_LONG = "silent-too-long"
    #: the log grew past its limit.
    LOG_LIMIT_EXCEEDED = "log-limit-exceeded"
    #: ``$OUT`` grew past its limit.
    OUTPUT_LIMIT_EXCEEDED = "output-limit-exceeded"
    #: a build it depends on failed, so it never ran.
    DEPENDENCY_FAILED = "dependency-failed"
    #: the builder running it was lost (infrastructure failure, retried).
    BUILDER_LOST = "builder-lost"
    #: its inputs could not be fetched (infrastructure failure, retried).
    FETCH_FAILED = "fetch-failed"
    #: its outputs could not be uploaded (infrastructure failure, retried).
    UPLOAD_FAILED = "upload-failed"
    #: the builder could not prepare the build (infrastructure failure, retried).
    INTERNAL_ERROR = "internal-error"
    #: cancelled by an operator.
    CANCELLED = "cancelled"

    @property
    def is_infrastructure(self) -> bool:
        """True for failures that are the farm's fault, not the build's: these are retried."""
        return self in _INFRASTRUCTURE


_INFRASTRUCTURE = frozenset(
    {
        BuildStatus.BUILDER_LOST,
        BuildStatus.FETCH_FAILED,
        BuildStatus.UPLOAD_FAILED,
        BuildStatus.INTERNAL_ERROR,
    }
)


_EMPTY_MAP: Mapping[str, Any] = {}


# ---------------------------------------------------------------------------------------------
# Records (nested maps without a tag).


@attrs.frozen(kw_only=True)
class BuildRef:
    """A build and the attempt it runs under."""

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)


@attrs.frozen(kw_only=True)
class FileInfo:
    """One file of a build's output (or of an input), addressed by content.

    ``path`` is relative with ``/`` separators.  ``link`` is set (and ``sha256`` is the hash of
    the empty string) for a symbolic link, which is stored as a link and never followed.
    """

    path: str = attrs.field(validator=v.check_relative_path)
    size: int = attrs.field(validator=v.check_count)
    sha256: str = attrs.field(validator=v.sha256_hex)
    executable: bool = attrs.field(default=False, validator=v.check_bool)
    link: str = attrs.field(default="", validator=v.check_str)

    @classmethod
    def found(cls, path: str, size: int, sha256: str, executable: bool) -> FileInfo:
        """A regular file this process found and hashed itself: ``path`` made of names read
        from a directory (never empty, ``.``, ``..``, nor holding ``/`` or NUL), already
        checked to be UTF-8, ``size`` what it read, ``sha256`` what it computed.  The
        validators' checks hold by construction but for the length, so they are skipped
        (6 us a file, 0.6 s of a scan of 100,000 outputs); a path too long is built the
        checked way, which refuses it."""
        if len(path) > v.MAX_STRING or type(executable) is not bool:
            return cls(path=path, size=size, sha256=sha256, executable=executable)
        info = object.__new__(cls)
        put = object.__setattr__  # (what attrs' own __init__ of a frozen class does)
        put(info, "path", path)
        put(info, "size", size)
        put(info, "sha256", sha256)
        put(info, "executable", executable)
        put(info, "link", "")
        return info


@attrs.frozen(kw_only=True)
class InputSpec:
    """The output of one dependency, to be placed under ``$IN/<name>``."""

    name: str = attrs.field(validator=v.check_nonempty_str)
    build_id: str = attrs.field(validator=v.check_nonempty_str)
    files: tuple[FileInfo, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.records_of(FileInfo)
    )
    #: (1.3) true: ``files`` is empty and the builder asks for the listing in pieces
    #: (``ListRequest``), so an ``Assign`` stays small whatever its inputs hold.
    listed: bool = attrs.field(default=False, validator=v.check_bool)


@attrs.frozen(kw_only=True)
class Limits:
    """Limits a builder enforces on one build; ``None`` means no limit."""

    timeout: float | None = attrs.field(default=None, validator=v.check_seconds_or_none)
    max_silent: float | None = attrs.field(default=None, validator=v.check_seconds_or_none)
    max_log_bytes: int | None = attrs.field(default=None, validator=v.check_count_or_none)
    max_output_bytes: int | None = attrs.field(default=None, validator=v.check_count_or_none)


# ---------------------------------------------------------------------------------------------
# Messages.

_B = frozenset({Role.BUILDER})
_R = frozenset({Role.RUNNER})
_BOTH = frozenset({Role.BUILDER, Role.RUNNER})


@attrs.frozen(kw_only=True)
class Challenge:
    """Runner -> builder, the first frame of every connection: a fresh nonce to prove the
    shared token against (``hydra_trio.auth``), so a proof seen on one connection is worthless
    on any other."""

    TAG: ClassVar[str] = "challenge"
    SENDERS: ClassVar[frozenset[Role]] = _R

    protocol_version: str = attrs.field(validator=v.check_nonempty_str)
    nonce: bytes = attrs.field(validator=v.check_nonce)
    #: whether the runner refuses builders without a valid proof (it has a token configured).
    token_required: bool = attrs.field(default=False, validator=v.check_bool)


@attrs.frozen(kw_only=True)
class Hello:
    """Builder -> runner, answering ``Challenge``: who the builder is and what it can build."""

    TAG: ClassVar[str] = "hello"
    SENDERS: ClassVar[frozenset[Role]] = _B

    protocol_version: str = attrs.field(validator=v.check_nonempty_str)
    machine_id: str = attrs.field(validator=v.check_nonempty_str)
    hostname: str = attrs.field(validator=v.check_nonempty_str)
    systems: tuple[str, ...] = attrs.field(converter=v.as_tuple, validator=v.check_str_tuple)
    supported_features: tuple[str, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.check_str_tuple
    )
    mandatory_features: tuple[str, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.check_str_tuple
    )
    max_jobs: int = attrs.field(default=1, validator=v.check_positive_int)
    speed_factor: float = attrs.field(default=1.0, validator=v.check_positive_number)
    ping_interval: float = attrs.field(default=10.0, validator=v.check_positive_number)
    #: the builder's proof that it knows the shared token: ``auth.prove(token, nonce,
    #: machine_id)`` for the challenge's nonce (empty when the builder has no token).
    credentials: bytes = attrs.field(default=b"", validator=v.check_bytes)
    #: what it can run (1.1): ``command`` (an ``Assign``'s command) and ``nix`` (an
    #: ``Assign``'s ``drv``); a 1.0 builder sends nothing and runs commands only.
    executors: tuple[str, ...] = attrs.field(
        default=(ExecutorKind.COMMAND.value,), converter=v.as_tuple, validator=v.check_str_tuple
    )
    #: (1.4) a random word the builder process picks once at start: a hello with the machine id
    #: of a live session but another instance is a second builder (a copied work dir), refused
    #: with ``duplicate-machine``; the same instance is the same process reconnecting.
    instance: str = attrs.field(default="", validator=v.check_str)


@attrs.frozen(kw_only=True)
class Welcome:
    """Runner -> builder: the hello was accepted; the connection is established."""

    TAG: ClassVar[str] = "welcome"
    SENDERS: ClassVar[frozenset[Role]] = _R

    protocol_version: str = attrs.field(validator=v.check_nonempty_str)
    session_id: str = attrs.field(validator=v.check_nonempty_str)
    #: how long the runner waits for a frame before it declares this builder lost.
    builder_timeout: float = attrs.field(validator=v.check_positive_number)


class RejectCode(enum.Enum):
    """Why a runner refused a hello: ``Reject.code`` on the wire is the value."""

    #: the builder speaks another major version of the protocol.
    INCOMPATIBLE_VERSION = "incompatible-version"
    #: the builder did not prove it knows the runner's token.
    AUTH_FAILED = "auth-failed"
    #: (1.2) this runner is a hot standby: ``Reject.leader`` names the leading runner.
    STANDBY = "standby"
    #: (1.4) another builder process (``Hello.instance``) is connected with this machine id.
    DUPLICATE_MACHINE = "duplicate-machine"


@attrs.frozen(kw_only=True)
class Reject:
    """Runner -> builder: the hello was refused; the runner closes the connection."""

    TAG: ClassVar[str] = "reject"
    SENDERS: ClassVar[frozenset[Role]] = _R

    #: machine-readable: a ``RejectCode`` value (``incompatible-version``, ``auth-failed``,
    #: ``standby``: this runner is a hot standby, connect to ``leader``), or one a newer
    #: runner added.
    code: str = attrs.field(validator=v.check_nonempty_str)
    reason: str = attrs.field(validator=v.check_str)
    #: (1.2) with code ``standby``: the leading runner's builder address (``HOST:PORT``), or
    #: "" while none is known.
    leader: str = attrs.field(default="", validator=v.check_str)


@attrs.frozen(kw_only=True)
class Ping:
    """Builder -> runner, every ping interval: I am alive, and this is what I run."""

    TAG: ClassVar[str] = "ping"
    SENDERS: ClassVar[frozenset[Role]] = _B

    seq: int = attrs.field(validator=v.check_count)
    load: float = attrs.field(default=0.0, validator=v.check_seconds)
    disk_free: int = attrs.field(default=0, validator=v.check_count)
    running: tuple[BuildRef, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.records_of(BuildRef)
    )
    #: (1.3) its free disk is below its minimum: send it no new build until a ping says
    #: otherwise (what it runs goes on).
    low_disk: bool = attrs.field(default=False, validator=v.check_bool)


@attrs.frozen(kw_only=True)
class Pong:
    """Runner -> builder: the answer to ``Ping`` with the same ``seq``.

    (1.6) ``settling``: results received before the ping that the runner is still checking
    and committing.  The runner answers a ping at once (liveness must not wait for a commit
    of 100,000 files); when ``settling`` is not 0, a second Pong with the same ``seq`` and
    ``settling`` 0 follows once they are settled.  A Pong with ``settling`` 0 thus says that
    every frame the builder sent before the ping has been handled."""

    TAG: ClassVar[str] = "pong"
    SENDERS: ClassVar[frozenset[Role]] = _R

    seq: int = attrs.field(validator=v.check_count)
    settling: int = attrs.field(default=0, validator=v.check_count)


@attrs.frozen(kw_only=True)
class Assign:
    """Runner -> builder: run this build under this attempt."""

    TAG: ClassVar[str] = "assign"
    SENDERS: ClassVar[frozenset[Role]] = _R

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    name: str = attrs.field(default="", validator=v.check_str)
    command: tuple[str, ...] = attrs.field(converter=v.as_tuple, validator=v.check_str_tuple)
    env: Mapping[str, str] = attrs.field(default=_EMPTY_MAP, validator=v.check_str_map)
    inputs: tuple[InputSpec, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.records_of(InputSpec)
    )
    limits: Limits = attrs.field(factory=Limits, validator=v.exactly(Limits))
    #: (1.1) non-empty: realise this Nix derivation (a store path) with the ``nix`` executor;
    #: ``command`` is then only for humans.
    drv: str = attrs.field(default="", validator=v.check_str)
    #: (1.1) for ``drv``: ``nix-store --export`` files of its input closure, one per store
    #: path (``path`` is the store path without its leading ``/``), each listed after the
    #: paths it references.  The builder fetches (as inputs) those its store lacks.
    store_paths: tuple[FileInfo, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.records_of(FileInfo)
    )
    #: (1.5) the build asked for the network (it requires ``NETWORK_FEATURE``): a sandboxing
    #: builder lets it share its network namespace; without it a sandboxed build has none.
    network: bool = attrs.field(default=False, validator=v.check_bool)

    @command.validator
    def _command_not_empty(self, attr: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
        if not value:
            raise ValueError("command: must not be empty")

    @property
    def executor(self) -> ExecutorKind:
        """The executor this assignment asks for."""
        return ExecutorKind.NIX if self.drv else ExecutorKind.COMMAND


@attrs.frozen(kw_only=True)
class Abort:
    """Runner -> builder: stop this attempt of this build (cancelled, or no longer current)."""

    TAG: ClassVar[str] = "abort"
    SENDERS: ClassVar[frozenset[Role]] = _R

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    reason: str = attrs.field(default="", validator=v.check_str)


@attrs.frozen(kw_only=True)
class Progress:
    """Builder -> runner: the build entered a new phase."""

    TAG: ClassVar[str] = "progress"
    SENDERS: ClassVar[frozenset[Role]] = _B

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    phase: Phase = attrs.field(validator=v.exactly(Phase))


@attrs.frozen(kw_only=True)
class LogChunk:
    """Builder -> runner: the next bytes of a build's log (stdout and stderr merged)."""

    TAG: ClassVar[str] = "log"
    SENDERS: ClassVar[frozenset[Role]] = _B

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    data: bytes = attrs.field(validator=v.check_bytes)


@attrs.frozen(kw_only=True)
class Result:
    """Builder -> runner: how an attempt ended.  Committed only if ``attempt`` is current."""

    TAG: ClassVar[str] = "result"
    SENDERS: ClassVar[frozenset[Role]] = _B

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    status: BuildStatus = attrs.field(validator=v.exactly(BuildStatus))
    exit_code: int | None = attrs.field(default=None, validator=v.check_int_or_none)
    #: seconds spent per phase: ``fetch``, ``build``, ``upload``.
    timings: Mapping[str, float] = attrs.field(default=_EMPTY_MAP, validator=v.check_float_map)
    outputs: tuple[FileInfo, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.records_of(FileInfo)
    )
    error: str = attrs.field(default="", validator=v.check_str)
    #: (1.3) how many files ``OutputList`` frames of this attempt listed before this Result;
    #: they come before ``outputs`` in the attempt's output listing.
    listed_outputs: int = attrs.field(default=0, validator=v.check_count)


@attrs.frozen(kw_only=True)
class Drain:
    """Either way: runner -> builder, stop taking work; builder -> runner, I am shutting down
    and will finish what I run (a draining builder keeps pinging and is never reported lost)."""

    TAG: ClassVar[str] = "drain"
    SENDERS: ClassVar[frozenset[Role]] = _BOTH

    reason: str = attrs.field(default="", validator=v.check_str)


@attrs.frozen(kw_only=True)
class Goodbye:
    """Either way: a clean close; the sender closes the connection after it."""

    TAG: ClassVar[str] = "goodbye"
    SENDERS: ClassVar[frozenset[Role]] = _BOTH

    reason: str = attrs.field(default="", validator=v.check_str)


#: (1.2) ``Goodbye.reason`` of a runner stopping on purpose: the builder reconnects soon (to
#: it or to another runner of its list) without counting a fault.
RUNNER_STOPPING = "runner-stopping"


@attrs.frozen(kw_only=True)
class FetchRequest:
    """Builder -> runner: send me ``length`` bytes at ``offset`` of the input file with this
    content hash (an input of a build this builder runs under ``attempt``).  Pull-based, so the
    builder bounds how much is in flight."""

    TAG: ClassVar[str] = "fetch"
    SENDERS: ClassVar[frozenset[Role]] = _B

    request_id: int = attrs.field(validator=v.check_count)
    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    sha256: str = attrs.field(validator=v.sha256_hex)
    offset: int = attrs.field(default=0, validator=v.check_count)
    length: int = attrs.field(default=256 * 1024, validator=v.check_positive_int)


@attrs.frozen(kw_only=True)
class FetchFiles:
    """(1.7) Builder -> runner: send me the whole of each of these input files (of a build
    this builder runs under ``attempt``), one after the other in this order, as one answer of
    ``FetchData`` frames: many small files for one request and a few frames."""

    TAG: ClassVar[str] = "fetch-files"
    SENDERS: ClassVar[frozenset[Role]] = _B

    request_id: int = attrs.field(validator=v.check_count)
    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    files: tuple[str, ...] = attrs.field(converter=v.as_tuple, validator=v.check_sha256_tuple)

    @files.validator
    def _files_bounded(self, attr: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
        if not 0 < len(value) <= MAX_FETCH_FILES:
            raise ValueError(f"files: from 1 to {MAX_FETCH_FILES} hashes, got {len(value)}")


@attrs.frozen(kw_only=True)
class FetchData:
    """Runner -> builder: the bytes of one ``FetchRequest``; ``eof`` when they reach the end of
    the file; ``error`` set means the request failed."""

    TAG: ClassVar[str] = "fetch-data"
    SENDERS: ClassVar[frozenset[Role]] = _R

    request_id: int = attrs.field(validator=v.check_count)
    data: bytes = attrs.field(default=b"", validator=v.check_bytes)
    eof: bool = attrs.field(default=False, validator=v.check_bool)
    error: str = attrs.field(default="", validator=v.check_str)


@attrs.frozen(kw_only=True)
class ListRequest:
    """(1.3) Builder -> runner: send me the output listing of the input ``of`` (an
    ``InputSpec.build_id`` of a build this builder runs under ``attempt``, with ``listed``
    set), from its file number ``start`` on.  Answered by exactly one ``ListData``."""

    TAG: ClassVar[str] = "list"
    SENDERS: ClassVar[frozenset[Role]] = _B

    request_id: int = attrs.field(validator=v.check_count)
    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    of: str = attrs.field(validator=v.check_nonempty_str)
    start: int = attrs.field(default=0, validator=v.check_count)


@attrs.frozen(kw_only=True)
class ListData:
    """(1.3) Runner -> builder: the answer to one ``ListRequest``: the next files of the
    listing (at least one unless it has no more), ``end`` when they reach its end; ``error``
    set means the request failed."""

    TAG: ClassVar[str] = "list-data"
    SENDERS: ClassVar[frozenset[Role]] = _R

    request_id: int = attrs.field(validator=v.check_count)
    files: tuple[FileInfo, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.records_of(FileInfo)
    )
    end: bool = attrs.field(default=False, validator=v.check_bool)
    error: str = attrs.field(default="", validator=v.check_str)


@attrs.frozen(kw_only=True)
class OutputList:
    """(1.3) Builder -> runner: the next files of an attempt's output listing, sent before
    its ``Result`` (whose ``listed_outputs`` counts them), so no frame holds all of them."""

    TAG: ClassVar[str] = "outputs"
    SENDERS: ClassVar[frozenset[Role]] = _B

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    files: tuple[FileInfo, ...] = attrs.field(
        default=(), converter=v.as_tuple, validator=v.records_of(FileInfo)
    )


@attrs.frozen(kw_only=True)
class UploadData:
    """Builder -> runner: the next chunk of one output file of an attempt.

    The first chunk of a file carries ``offset`` 0; the last carries ``eof`` and the file's
    ``FileInfo`` so the runner can check size and hash before it keeps the file.
    """

    TAG: ClassVar[str] = "upload"
    SENDERS: ClassVar[frozenset[Role]] = _B

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    path: str = attrs.field(validator=v.check_relative_path)
    offset: int = attrs.field(validator=v.check_count)
    data: bytes = attrs.field(default=b"", validator=v.check_bytes)
    eof: bool = attrs.field(default=False, validator=v.check_bool)


@attrs.frozen(kw_only=True)
class UploadFiles:
    """(1.7) Builder -> runner: several whole output files of an attempt in one frame, each
    as an ``UploadData`` with ``offset`` 0 and ``eof`` would carry it: ``paths[i]`` holds
    ``data[i]``."""

    TAG: ClassVar[str] = "upload-files"
    SENDERS: ClassVar[frozenset[Role]] = _B

    build_id: str = attrs.field(validator=v.check_nonempty_str)
    attempt: int = attrs.field(validator=v.check_count)
    paths: tuple[str, ...] = attrs.field(converter=v.as_tuple, validator=v.check_path_tuple)
    data: tuple[bytes, ...] = attrs.field(converter=v.as_tuple, validator=v.check_bytes_tuple)

    @data.validator
    def _one_each(self, attr: attrs.Attribute[Any], value: tuple[bytes, ...]) -> None:
        if not 0 < len(self.paths) <= MAX_UPLOAD_FILES:
            raise ValueError(f"paths: from 1 to {MAX_UPLOAD_FILES} files, got {len(self.paths)}")
        if len(value) != len(self.paths):
            raise ValueError(f"data: {len(value)} items for {len(self.paths)} paths")


Message = (
    Challenge
    | Hello
    | Welcome
    | Reject
    | Ping
    | Pong
    | Assign
    | Abort
    | Progress
    | LogChunk
    | Result
    | Drain
    | Goodbye
    | FetchRequest
    | FetchFiles
    | FetchData
    | UploadData
    | UploadFiles
    | ListRequest
    | ListData
    | OutputList
)

MESSAGE_TYPES: tuple[type[Message], ...] = typing.get_args(Message)
BY_TAG: dict[str, type[Message]] = {cls.TAG: cls for cls in MESSAGE_TYPES}
RECORD_TYPES: tuple[type[Any], ...] = (BuildRef, FileInfo, InputSpec, Limits)


# ---------------------------------------------------------------------------------------------
# Conversion between messages and plain msgpack-able maps.  The per-class plans are computed
# once at import so the hot path is a loop over (name, converter) pairs.

_Plan = tuple[tuple[str, Callable[[Any], Any] | None, bool], ...]


def _field_kind(cls: type[Any], field: attrs.Attribute[Any]) -> Callable[[Any], Any] | None:
    """The decoder for a field's wire value: records and enums need one, scalars do not."""
    hints = typing.get_type_hints(cls)
    hint = hints[field.name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in RECORD_TYPES:
        return functools.partial(_decode_record, hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return functools.partial(_decode_enum, hint)
    if origin is tuple and args and args[0] in RECORD_TYPES:
        return functools.partial(_decode_record_list, args[0])
    return None


def _plan(cls: type[Any]) -> _Plan:
    return tuple(
        (f.name, _field_kind(cls, f), f.default is attrs.NOTHING) for f in attrs.fields(cls)
    )


def _decode_enum(kind: type[enum.Enum], raw: object) -> object:
    try:
        return kind(raw)
    except (ValueError, TypeError):
        return raw  # the validator reports it, naming the field


def _decode_record_list(record: type[Any], raw: object) -> object:
    if type(raw) is not list or len(raw) > v.MAX_LIST:
        return raw
    if not raw:
        return ()  # (every Ping of an idle builder)
    return tuple(_decode_record(record, item) for item in raw)


def _decode_record(record: type[Any], raw: object) -> object:
    if not isinstance(raw, dict):
        return raw
    flat = _FLAT.get(record)
    if flat is not None and raw.keys() <= flat.keys and flat.required <= raw.keys():
        # a record of scalars with the fields it should have (every FileInfo of a listing
        # of 100,000): built at once, the validators checking each field
        try:
            return record(**raw)
        except (ValueError, TypeError) as exc:
            raise RemoteProtocolError(f"{record.__name__}.{exc}") from None
    return _build(record, _PLANS[record], raw, record.__name__)


def _build(cls: type[Any], plan: _Plan, raw: dict[Any, Any], what: str) -> Any:
    kwargs: dict[str, Any] = {}
    for name, decode, required in plan:
        if name in raw:
            value = raw[name]
            kwargs[name] = decode(value) if decode is not None else value
        elif required:
            raise RemoteProtocolError(f"{what}: missing field {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"{what}.{exc}") from None


_PLANS: dict[type[Any], _Plan] = {cls: _plan(cls) for cls in (*RECORD_TYPES, *MESSAGE_TYPES)}


@attrs.frozen
class _Flat:
    """A record whose fields are all scalars (no record, tuple or enum to convert)."""

    names: tuple[str, ...]
    keys: frozenset[str]
    required: frozenset[str]
    #: the fields' values of a record, as a tuple, in C.
    get: Callable[[Any], tuple[Any, ...]]


def _flat(cls: type[Any]) -> _Flat | None:
    plan = _PLANS[cls]
    if any(decode is not None for _, decode, _ in plan) or len(plan) < 2:
        return None
    names = tuple(name for name, _, _ in plan)
    return _Flat(
        names=names,
        keys=frozenset(names),
        required=frozenset(name for name, _, required in plan if required),
        get=operator.attrgetter(*names),
    )


_FLAT: dict[type[Any], _Flat] = {
    cls: flat for cls in RECORD_TYPES if (flat := _flat(cls)) is not None
}


@attrs.frozen
class _Shape:
    """What ``from_wire`` needs of one message class, computed at import."""

    #: the keys a frame of this class may carry: ``"type"`` and the field names.
    keys: frozenset[str]
    #: the required fields.
    required: frozenset[str]
    #: (name, decoder) of the fields holding records or enums.
    decoders: tuple[tuple[str, Callable[[Any], Any]], ...]


def _shape(cls: type[Message]) -> _Shape:
    plan = _PLANS[cls]
    names = tuple(name for name, _, _ in plan)
    return _Shape(
        keys=frozenset(("type", *names)),
        required=frozenset(name for name, _, required in plan if required),
        decoders=tuple((name, decode) for name, decode, _ in plan if decode is not None),
    )


def from_wire(raw: object) -> Message:
    """Turn one decoded msgpack value into a message, or raise ``RemoteProtocolError``."""
    if not isinstance(raw, dict):
        raise RemoteProtocolError(f"frame is a {v.type_name(raw)}, not a map")
    tag = raw.get("type")
    cls = BY_TAG.get(tag) if type(tag) is str else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {tag!r}")
    # What ``_build`` does, with the copying and the check for required fields done in C:
    # every received frame comes through here.
    shape = _SHAPES[cls]
    if raw.keys() <= shape.keys:
        kwargs = raw.copy()
        del kwargs["type"]
    else:  # keys a newer minor version added: ignored
        kwargs = {k: value for k, value in raw.items() if k in shape.keys and k != "type"}
    if not shape.required <= kwargs.keys():
        # _build reports the first problem in field order (a missing field, or a bad record).
        return _build(cls, _PLANS[cls], raw, cls.TAG)  # type: ignore[no-any-return]
    for name, decode in shape.decoders:
        if name in kwargs:
            kwargs[name] = decode(kwargs[name])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"{cls.TAG}.{exc}") from None


_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})


def _to_plain(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:  # most values: skip the checks for containers below
        return value
    if kind is tuple:
        return [_to_plain(v) for v in value]
    flat = _FLAT.get(kind)
    if flat is not None:  # scalars only: as they are (what _to_plain returns for each)
        return dict(zip(flat.names, flat.get(value), strict=True))
    if kind in _PLANS:
        return {name: _to_plain(getattr(value, name)) for name, _, _ in _PLANS[kind]}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return dict(value)
    return value


def to_wire(message: Message) -> dict[str, Any]:
    """The msgpack-able map for a message, with its ``"type"`` tag."""
    wire: dict[str, Any] = {"type": message.TAG}
    for name, decode, _ in _PLANS[type(message)]:
        value = getattr(message, name)
        wire[name] = value if decode is None and type(value) is not tuple else _to_plain(value)
    return wire


_SHAPES: dict[type[Any], _Shape] = {cls: _shape(cls) for cls in MESSAGE_TYPES}


def parse_version(version: str) -> tuple[int, int] | None:
    """``"1.0"`` -> ``(1, 0)``; ``None`` when the string is not ``MAJOR.MINOR``."""
    major, sep, minor = version.partition(".")
    # The version comes from the peer: ASCII digits only (str.isdigit() is also true for "²",
    # which int() rejects), and short enough that int() cannot hit its digit limit.
    if not sep or not _is_ascii_number(major) or not _is_ascii_number(minor):
        return None
    return int(major), int(minor)


def _is_ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 9


def speaks(version: str, minor: int) -> bool:
    """Whether a peer of ``version`` (compatible with ours) has minor version ``minor`` or
    later, and so knows what that version added."""
    parsed = parse_version(version)
    return parsed is not None and parsed[1] >= minor


def compatible(ours: str, theirs: str) -> bool:
    """Same major version: compatible (minor versions only add optional fields)."""
    a, b = parse_version(ours), parse_version(theirs)
    return a is not None and b is not None and a[0] == b[0]
