"""What celery_fleet.activate() changes in a process, checked in one run by fleet-python."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from urllib.parse import quote

from fleettest.commands import BIN, run
from fleettest.local import RedisServer

TRANSIENT_REFUSALS_ARE_LOST_CONNECTIONS = """
from celery import Celery
from redis._parsers.base import BaseParser
app = Celery(broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/1")
connection = app.connection_for_read()
for answer in ("OOM command not allowed", "MISCONF Errors writing to the AOF file: No space left"):
    error = type(BaseParser.parse_error(answer))
    print(
        error.__name__,
        error in connection.connection_errors,
        error in connection.recoverable_connection_errors,
        error in app.backend.connection_errors,
    )
"""


def test_redis_refusing_writes_for_memory_or_disk_counts_as_a_lost_connection():
    """Fix 6: kombu's consumer and publisher and Celery's result backend retry OOM and MISCONF."""
    proc = run([str(BIN / "fleet-python"), "-c", TRANSIENT_REFUSALS_ARE_LOST_CONNECTIONS])
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert lines == [
        ["OutOfMemoryError", "True", "True", "True"],
        ["PersistenceError", "True", "True", "True"],
    ]


def run_with_redis(
    script: str, server: RedisServer, db: int, variable: str
) -> subprocess.CompletedProcess[str]:
    """Run a script with fleet-python, the local Redis' URL (database db) in the variable."""
    password = quote(server.password, safe="")
    url = f"redis://{server.username}:{password}@127.0.0.1:{server.port}/{db}"
    # The URL carries the password: through the environment, not the command line.
    proc = run([str(BIN / "fleet-python"), "-c", script], env={**os.environ, variable: url})
    assert proc.returncode == 0, proc.stderr
    return proc


# A worker's broker channel over the local Redis (WORKER_CHANNEL_BROKER_URL), with the fleet's
# atomic pop; `inspect` reads Redis beside it.
WORKER_CHANNEL = """
import os, time
import redis
from celery import Celery
from kombu import Queue
from celery_fleet import lease, transport

url = os.environ["WORKER_CHANNEL_BROKER_URL"]
inspect = redis.Redis.from_url(url)
app = Celery(broker=url)
app.conf.broker_transport_options = {"visibility_timeout": 30, "priority_steps": [0]}
transport.Channel.atomic_pop = True
"""

UNANSWERED_POP = (
    WORKER_CHANNEL
    + """
with app.connection_for_read() as conn:
    channel = conn.channel()
    queue = Queue("unanswered", routing_key="unanswered")
    conn.Producer(channel).publish({"n": 1}, routing_key="unanswered", declare=[queue])
    channel.basic_consume("unanswered", False, lambda message: None, "unanswered-test")
    # What kombu's poller does when it registers the channel for BRPOP.
    channel.client.connection = channel.client.connection_pool.get_connection("_")
    channel._brpop_start()
    first = channel._fleet_moving
    time.sleep(0.5)
    # The server moved the message; its answer never arrives (the connection is dropped unread).
    channel.client.connection.disconnect()
    stranded = inspect.llen(first)
    channel._brpop_start()
    print(stranded, first in lease._closed_processing, channel._fleet_moving != first)
    time.sleep(channel.brpop_timeout + 0.5)  # the new pop found the queue empty
    # The keeper moves the retired list back to the queue.
    keeper = lease.LeaseKeeper(app)
    keeper._reclaim_processing(keeper._channel())
    print(inspect.llen(first), inspect.llen("unanswered"))
"""
)


def test_a_pop_whose_answer_was_lost_is_moved_back_to_its_queue(redis_server):
    """A BLMOVE the server ran but whose reply never came (a partition) strands no message."""
    proc = run_with_redis(UNANSWERED_POP, redis_server, 5, "WORKER_CHANNEL_BROKER_URL")
    assert [line.split() for line in proc.stdout.splitlines()] == [
        ["1", "True", "True"],
        ["0", "1"],
    ]


LOST_RECORD_REPLY = (
    WORKER_CHANNEL
    + """
from types import SimpleNamespace
from redis.client import Pipeline

execute = Pipeline.execute

def run_then_lose_the_reply(pipe, *args, **kwargs):
    if not any(command[0] == "LREM" for command, _ in pipe.command_stack):
        return execute(pipe, *args, **kwargs)
    # A Redis restart at the wrong moment: the transaction that records the delivery reaches
    # the server and runs there; the connection closes before its reply is read.
    conn = pipe.connection_pool.get_connection("MULTI")
    commands = [("MULTI",), *(command for command, _ in pipe.command_stack), ("EXEC",)]
    conn.send_packed_command(conn.pack_commands(commands))
    time.sleep(0.2)
    conn.disconnect()
    raise redis.ConnectionError("Connection closed by server.")

Pipeline.execute = run_then_lose_the_reply
received = []
with app.connection_for_read() as conn:
    channel = conn.channel()
    keeper = lease.LeaseKeeper(app)
    keeper.consumer = SimpleNamespace(
        hostname="lost-reply@test", task_consumer=SimpleNamespace(channel=channel, queues=[])
    )
    lease._keeper = keeper  # what a worker's start does (celeryd_init)
    queue = Queue("lostreply", routing_key="lostreply")
    conn.Producer(channel).publish({"n": 1}, routing_key="lostreply", declare=[queue])
    channel.basic_consume("lostreply", False, received.append, "lost-reply-test")
    channel.client.connection = channel.client.connection_pool.get_connection("_")
    channel._brpop_start()
    try:
        channel._brpop_read()
    except redis.ConnectionError as exc:
        print(type(exc).__name__, len(received), inspect.hlen("unacked"), inspect.llen("lostreply"))
    time.sleep(keeper.renew_every + 0.5)
    keeper.tick()
    print(inspect.hlen("unacked"), inspect.llen("lostreply"))
"""
)


def test_a_delivery_whose_record_lost_its_reply_is_requeued_at_the_next_renewal(redis_server):
    """The record in unacked ran on the server, its reply was lost: the message reached no
    task and is in no queue. The lease keeper requeues it at its next renewal, not a lease on."""
    proc = run_with_redis(LOST_RECORD_REPLY, redis_server, 8, "WORKER_CHANNEL_BROKER_URL")
    assert [line.split() for line in proc.stdout.splitlines()] == [
        ["ConnectionError", "0", "1", "0"],
        ["0", "1"],
    ]


RESULT_DURING_RESUBSCRIBE = """
import os, threading, time, uuid
import redis
from celery import Celery, states
from celery.exceptions import TimeoutError
from celery.result import AsyncResult, GroupResult

url = os.environ["RESUBSCRIBE_BACKEND_URL"]
admin = redis.Redis.from_url(url)
client = Celery(backend=url)
worker = Celery(backend=url)  # stores results on connections of its own, as a worker does
first, second = str(uuid.uuid4()), str(uuid.uuid4())
children = [AsyncResult(task_id, app=client) for task_id in (first, second)]
group = GroupResult(str(uuid.uuid4()), children, app=client)
redis_client = client.backend.client
mget = redis_client.mget
reads = []

def mget_then_finish_second(keys, *args):
    found = mget(keys, *args)
    if not reads:  # the reconnect's read of the stored results: the second task ends just after
        worker.backend.store_result(second, 2, states.SUCCESS)
    reads.append(len(keys))
    return found

def lose_connection_then_finish_first():
    time.sleep(1)
    redis_client.mget = mget_then_finish_second  # armed after the wait's own first read
    admin.client_kill_filter(_type="pubsub")  # what a Redis restart does to the waiting client
    time.sleep(1)
    worker.backend.store_result(first, 1, states.SUCCESS)

threading.Thread(target=lose_connection_then_finish_first, daemon=True).start()
got = []
try:
    for task_id, meta in group.iter_native(timeout=6, interval=0.1):
        got.append(meta["result"])
except TimeoutError:
    got.append("timeout")
print(sorted(got, key=str), reads[:1])
"""


def test_a_result_stored_while_the_client_resubscribes_reaches_it(redis_server):
    """Fix 7: a result stored between the reconnect's read and its new subscription is not lost."""
    proc = run_with_redis(RESULT_DURING_RESUBSCRIBE, redis_server, 6, "RESUBSCRIBE_BACKEND_URL")
    assert proc.stdout.split("\n")[0] == "[1, 2] [2]"


WRONG_PASSWORD = """
import os, time
from celery import Celery

url = os.environ["WRONG_PASSWORD_URL"]
app = Celery(broker=url, backend=url)
started = time.monotonic()
try:
    app.send_task("fleetapp.add", args=[1, 2])
    print("sent")
except Exception as exc:
    print(round(time.monotonic() - started), type(exc).__name__, exc)
"""


def test_a_refused_password_is_named_at_once(redis_server):
    """Fix 8: a wrong password raises at once, naming the user, not a result-store retry limit
    after about 15 s (Celery took the refusal for a lost connection)."""
    wrong = replace(redis_server, password="not-" + redis_server.password)
    proc = run_with_redis(WRONG_PASSWORD, wrong, 7, "WRONG_PASSWORD_URL")
    seconds, _, message = proc.stdout.strip().partition(" ")
    assert int(seconds) < 3, proc.stdout
    assert f"Redis refused the password of user '{redis_server.username}'" in message, message


CONF_CENSORED = """
import io, logging
from celery import Celery
kombu_log = io.StringIO()
logging.getLogger("kombu").addHandler(logging.StreamHandler(kombu_log))
app = Celery("censor", broker="rediss://worker:s3cret@127.0.0.1:1/0")
# What a worker answers to the conf control command (Flower sends it when it starts).
print(app.conf.table(with_defaults=False, censored=True)["broker_url"])
print(repr(kombu_log.getvalue()))
app.conf.broker_url = ["rediss://worker:s3cret@h1:6379/0", "rediss://worker:s3cret@h2:6379/0"]
print(app.conf.table(with_defaults=False, censored=True)["broker_url"])
"""


def test_a_worker_read_remotely_masks_its_broker_url_without_a_false_tls_warning():
    """Fix 10: the conf command masks the broker URL without building a kombu Connection, which
    logged "defaulting to insecure SSL behaviour" for a rediss:// URL (no connection was made)."""
    proc = run([str(BIN / "fleet-python"), "-c", CONF_CENSORED])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "rediss://worker:********@127.0.0.1:1/0",
        "''",
        "['rediss://worker:********@h1:6379/0', 'rediss://worker:********@h2:6379/0']",
    ]
