"""Hydra mode: hydra-trio as a drop-in ``hydra-queue-runner`` on Hydra's own database.

- ``codes``: Hydra's numeric codes and where its web UI looks for logs (pure).
- ``nixsupport``: what a build's outputs say about it (``nix-support/*``) for Hydra's tables.
- ``db``: every statement on Hydra's PostgreSQL database, blocking, run in worker threads.
- ``queue``: the queue source and the writer that keeps Hydra's tables in step with the farm.
"""
