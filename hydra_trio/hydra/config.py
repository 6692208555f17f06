"""The queue runner's Hydra-mode options (``--hydra-db``, ``--hydra-data``)."""

from __future__ import annotations

from pathlib import Path

import attrs


@attrs.frozen(kw_only=True)
class HydraConfig:
    #: Hydra's database (``postgresql://.../hydra``; Hydra's ``HYDRA_DATABASE_URL``).
    db: str
    #: Hydra's data dir (``HYDRA_DATA``, ``/var/lib/hydra``): logs go to ``build-logs/``
    #: under it, and ``queue-runner/lock`` is taken there as Hydra's runner does.
    data: Path
    #: what Hydra's runner uses when a build's ``timeout``/``maxsilent`` is NULL.
    default_timeout: int = 36000
    default_max_silent: int = 3600
