"""The queue runner daemon: machine registry, queue and scheduler, liveness, HTTP API."""

from __future__ import annotations
