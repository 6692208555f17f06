"""The hydra-trio wire protocol as a pure library: no trio, no sockets, no clock.

Time enters as a ``now: float`` argument; bytes go in and out.  The daemons in
``hydra_trio.runner`` and ``hydra_trio.builder`` do all the I/O.
"""

from __future__ import annotations
