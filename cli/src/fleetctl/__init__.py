"""celery-fleet on the control node."""
