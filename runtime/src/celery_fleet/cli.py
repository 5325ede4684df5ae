"""``fleet-celery``: the ``celery`` command with the fleet's runtime active.

Same arguments as ``celery``; the systemd units of the fleet run it instead of ``celery``.
"""

from __future__ import annotations

import sys


def main() -> None:
    from celery import maybe_patch_concurrency

    # First, as `celery` does: gevent must patch the standard library before anything uses it.
    if "multi" not in sys.argv:
        maybe_patch_concurrency()

    import celery_fleet

    celery_fleet.activate()

    from celery.bin.celery import main as celery_main

    sys.exit(celery_main())


if __name__ == "__main__":
    main()
