from __future__ import annotations

from hydra_trio.cli import main

main()
