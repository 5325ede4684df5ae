# The classic tutorial's Celery app, as a user writes it: a broker hard-coded to localhost and
# task modules listed in `include`. celery-fleet deploys it unchanged: Celery prefers
# CELERY_BROKER_URL from the environment, which the fleet sets, to the URL written here.
from celery import Celery

app = Celery(
    "celery_config",
    broker="redis://localhost:6379/0",
    include=["celery_blog", "celery_add", "pack.celery_fetch"],
)
