"""fleetapp: the tutorial's Celery app (fetch URLs, add numbers) made deployable."""

__version__ = "0.1.0"
