"""site.yml as a whole: syntax, idempotence, check mode, and the preflight's refusals."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from tests.conftest import REPO, on
from tests.fleet.conftest import CA_CERT, FRESH_CHECK, playbook, recap, secret

LAB_INVENTORY = REPO / "inventory" / "lab"


def test_syntax_check():
    result = playbook("site.yml", "--syntax-check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_second_run_changes_nothing(deployed):
    result = playbook("site.yml")
    assert result.returncode == 0, result.stdout[-6000:]
    hosts = recap(result)
    assert set(hosts) >= {"redis1", "worker1", "worker2", "client1", "monitor1"}
    changed = {host: counts["changed"] for host, counts in hosts.items() if counts["changed"]}
    assert changed == {}, result.stdout[-6000:]


def test_check_mode_succeeds_on_fresh_hosts(deployed):
    """--check before the first deploy: packages, users, venvs and units are all still missing."""
    result = FRESH_CHECK["result"]
    if result is None:
        pytest.skip("the lab was deployed before this session (make test starts on a fresh one)")
    assert result.returncode == 0, result.stdout[-6000:]
    assert all(counts["failed"] == 0 for counts in recap(result).values())
    hosts = {host: counts for host, counts in recap(result).items() if host != "localhost"}
    assert all(counts["changed"] > 0 for counts in hosts.values())  # fresh: all would change


def test_check_mode_succeeds(deployed):
    result = playbook("site.yml", "--check")
    assert result.returncode == 0, result.stdout[-6000:]
    assert all(counts["failed"] == 0 for counts in recap(result).values())


@pytest.mark.parametrize("tag", ["celery_worker_service", "celery_app_configure", "flower"])
def test_a_role_tag_works_on_its_own(deployed, tag):
    """No role relies on a fact that only another tag of it sets."""
    result = playbook("site.yml", "--tags", tag)
    assert result.returncode == 0, result.stdout[-4000:]
    assert all(counts["changed"] == 0 for counts in recap(result).values()), result.stdout[-4000:]


def bad_inventory(tmp_path, edit) -> str:
    """A copy of the lab inventory with one edit; group_vars shared with the real one."""
    inventory = yaml.safe_load((LAB_INVENTORY / "hosts.yml").read_text())
    edit(inventory["all"]["children"])
    target = tmp_path / "inventory"
    target.mkdir()
    (target / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (target / "group_vars").symlink_to(LAB_INVENTORY / "group_vars")
    return str(target)


def drop_redis(children):
    children["redis"] = {}


def redis_on_a_worker(children):
    children["workers"]["hosts"]["redis1"] = children["redis"]["hosts"]["redis1"]


def no_workers(children):
    children["workers"] = {}


def two_redis_hosts(children):
    children["redis"]["hosts"]["client1"] = children["clients"]["hosts"]["client1"]


def client_on_a_worker(children):
    children["workers"]["hosts"]["client1"] = children["clients"]["hosts"]["client1"]


def invalid_address(children):
    children["workers"]["hosts"]["worker2"]["ansible_host"] = "999.1.1.1"


def duplicate_address(children):
    children["clients"]["hosts"]["client1"]["ansible_host"] = "198.18.0.11"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            drop_redis,
            "group 'redis' needs one host, or an odd number of three or more for Sentinel"
            " (it has 0)",
        ),
        (two_redis_hosts, "two cannot fail over: when one is lost, the other is no majority"),
        (no_workers, "no host in group 'workers'"),
        (redis_on_a_worker, "redis1 is in both 'redis' and 'workers'"),
        (client_on_a_worker, "client1 belong to more than one of 'workers', 'clients'"),
        (invalid_address, "worker2 has no valid IPv4 fleet_private_address (999.1.1.1)"),
        (duplicate_address, "client1 and worker1 share the address 198.18.0.11"),
    ],
    ids=[
        "no-redis",
        "two-redis",
        "no-workers",
        "redis-and-worker",
        "two-tiers",
        "bad-ip",
        "same-ip",
    ],
)
def test_preflight_refuses_a_bad_inventory_before_touching_any_host(tmp_path, edit, message):
    result = playbook("site.yml", "-i", bad_inventory(tmp_path, edit))
    assert result.returncode != 0
    assert message in " ".join(result.stdout.split()), result.stdout[-4000:]
    # Nothing after the preflight ran: no other play started, no host changed.
    assert "PLAY [Redis broker" not in result.stdout
    assert all(counts["changed"] == 0 for counts in recap(result).values())


def test_a_missing_inventory_path_fails(tmp_path):
    missing = tmp_path / "typo"
    result = playbook("site.yml", "-i", str(missing))
    assert result.returncode != 0
    assert f"Completely failed to parse inventory source {missing}" in result.stderr
    assert "PLAY [" not in result.stdout


def test_an_empty_inventory_fails_naming_it_and_what_is_missing(tmp_path):
    (tmp_path / "hosts.yml").write_text("---\nall: {}\n")
    result = playbook("site.yml", "-i", str(tmp_path))
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert (
        f"Inventory {tmp_path}: group 'redis' needs one host, or an odd number of three or more"
        " for Sentinel (it has 0);"
        " it has no host in group 'workers' (at least one is needed)."
    ) in said, result.stdout[-3000:]
    assert "PLAY [Check every host" not in result.stdout


def test_an_inventory_without_a_redis_group_fails_before_touching_any_host(tmp_path):
    def no_redis_group(children):
        del children["redis"]

    inventory = bad_inventory(tmp_path, no_redis_group)
    result = playbook("site.yml", "-i", inventory)
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert f"Inventory {inventory}: group 'redis' needs one host, or an odd number" in said
    assert "PLAY [Check every host" not in result.stdout
    assert all(counts["changed"] == 0 for counts in recap(result).values())


# A Debian 11 host, as its own files tell Ansible's facts (the lab makes Debian 12 and 13 only).
BULLSEYE = (
    'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nNAME="Debian GNU/Linux"\nVERSION_ID="11"\n'
    'VERSION="11 (bullseye)"\nVERSION_CODENAME=bullseye\nID=debian\n'
)


def test_a_host_of_a_release_the_roles_do_not_support_is_refused_in_one_sentence():
    keep = "mv /etc/os-release /etc/debian_version /root/"
    on(
        "worker2",
        f"{keep} && printf '{BULLSEYE}' > /etc/os-release && echo 11.11 > /etc/debian_version",
    )
    try:
        result = playbook("site.yml")
    finally:
        on("worker2", "mv -f /root/os-release /root/debian_version /etc/")
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert (
        "worker2 runs Debian 11.11, and celery-fleet supports Debian 13 (trixie) and"
        " Debian 12 (bookworm) only."
    ) in said, result.stdout[-3000:]
    assert "PLAY [Redis broker" not in result.stdout
    assert all(counts["changed"] == 0 for counts in recap(result).values())


def test_a_project_that_does_not_build_stops_the_run_in_one_sentence(tmp_path):
    project = tmp_path / "broken"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "broken"\nversion = "not a version"\n'
    )
    result = playbook("site.yml", "-e", f"fleet_app_project_dir={project}")
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    sentence = f"The application project {project} does not build (python -m build):"
    assert sentence in said, said[-3000:]
    assert "PLAY [Redis broker" not in result.stdout


def test_a_missing_project_stops_the_run_in_one_sentence(tmp_path):
    result = playbook("site.yml", "-e", f"fleet_app_project_dir={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert f"The application project {tmp_path / 'nowhere'} has no pyproject.toml" in said
    assert "PLAY [Redis broker" not in result.stdout


def test_a_queue_map_without_a_consumer_for_a_routed_queue_is_refused(deployed):
    """fleetapp routes fetch_url to 'network': a map without it would strand those tasks."""
    only_default = json.dumps({"fleet_app_queues": [{"name": "default", "pool": "prefork"}]})
    result = playbook("site.yml", "-e", only_default)
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert (
        "fleet_app_queues: the application routes tasks to network, which no entry consumes"
    ) in said, said[-3000:]
    assert "PLAY [Redis broker" not in result.stdout
    # Refused before any worker unit changed.
    assert all(counts["changed"] == 0 for counts in recap(result).values()), said[-3000:]


@pytest.mark.parametrize("setting", ["redis_appendonly=false", "redis_appendfsync=no"])
def test_preflight_refuses_a_redis_without_durable_persistence(setting):
    result = playbook("site.yml", "-e", setting)
    assert result.returncode != 0
    assert "would lose the queued and running tasks when it restarts" in " ".join(
        result.stdout.split()
    ), result.stdout[-4000:]
    assert "PLAY [Redis broker" not in result.stdout


def test_a_key_prefix_an_acl_pattern_cannot_hold_is_refused_before_any_change():
    result = playbook("site.yml", "-e", "fleet_redis_key_prefix=app*")
    assert result.returncode != 0
    assert 'fleet_redis_key_prefix "app*" may hold only letters' in " ".join(result.stdout.split())
    assert all(counts["changed"] == 0 for counts in recap(result).values())


def test_a_ca_without_its_key_is_refused_before_any_change(tmp_path):
    """A user's own CA brought without its key could not sign the hosts' certificates."""
    (tmp_path / "ca.crt").write_text(CA_CERT.read_text())
    result = playbook("site.yml", "-e", f"fleet_tls_ca_dir={tmp_path}")
    assert result.returncode != 0
    assert "ca.crt exists but its key ca.key does not" in " ".join(result.stdout.split())
    assert all(counts["changed"] == 0 for counts in recap(result).values())


def test_preflight_refuses_a_weak_secret_without_showing_it():
    result = playbook("site.yml", "-e", "fleet_flower_password=short-secret")
    assert result.returncode != 0
    assert "fleet_flower_password: empty, shorter than 16 characters" in " ".join(
        result.stdout.split()
    )
    assert "short-secret" not in result.stdout
    assert "PLAY [Redis broker" not in result.stdout


def test_the_redis_admin_password_stays_off_command_lines(deployed):
    """-vvv prints every remote command line; ps on redis1, sampled during the run, shows them."""
    password = secret("redis-admin")
    seen: list[str] = []
    done = threading.Event()

    def sample_ps() -> None:
        while not done.is_set():
            seen.append(on("redis1", "ps -eo args", check=False).stdout)

    sampler = threading.Thread(target=sample_ps)
    sampler.start()
    try:
        result = playbook("site.yml", "--limit", "redis1", "--tags", "redis_service", "-vvv")
    finally:
        done.set()
        sampler.join()
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Check that Redis answers PING as the admin user" in result.stdout
    # The samples saw Ansible's remote commands (sh -c wraps every module it runs there).
    assert any("python3" in sample and "sh -c" in sample for sample in seen), seen[-1]
    assert password not in result.stdout + result.stderr
    assert not [sample for sample in seen if password in sample]
