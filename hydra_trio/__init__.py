"""hydra-trio: a build farm whose builder connections can never die silently."""

from __future__ import annotations

__version__ = "0.1.0"
