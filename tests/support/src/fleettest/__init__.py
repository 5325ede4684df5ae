"""celery-fleet's test support, shared by the tests and the benchmarks.

- webfarm: the stand-in for the internet (also served on the lab host by `lab up`);
- local: a real redis-server and real Celery workers on loopback;
- commands: running a command the way a user does, output captured.
"""
