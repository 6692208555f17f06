"""The builder daemon: dials the queue runner, pings, runs builds, reconnects."""

from __future__ import annotations
