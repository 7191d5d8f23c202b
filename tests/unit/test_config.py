"""Settings from the environment: defaults, normalisation, and one clear line per bad value."""

from __future__ import annotations

import pytest

from scanqueue.config import Settings, mask_url, normalize_database_url
from scanqueue.errors import ConfigError


def test_defaults_match_the_old_go_pool() -> None:
    s = Settings.from_env({})
    assert s.database_url == "sqlite:///scanqueue.db"
    assert (s.concurrency, s.max_concurrency, s.poll_every_s) == (2, 6, 0.5)
    assert s.broker_url.startswith("sqla+sqlite:///") and s.broker_url.endswith(
        "scanqueue-broker.db"
    )
    assert (s.lease_s, s.max_attempts, s.cancel_grace_s, s.connect_timeout_s) == (30, 3, 10, 60)
    assert s.metrics_port == 0 and s.redis_url is None


def test_max_concurrency_defaults_to_concurrency_plus_four() -> None:
    assert Settings.from_env({"SCANQUEUE_CONCURRENCY": "3"}).max_concurrency == 7


@pytest.mark.parametrize(
    "raw",
    ["postgres://u:pw@db.example:5432/app", "postgresql://u:pw@db.example:5432/app"],
)
def test_platform_postgres_urls_mean_psycopg2(raw: str) -> None:
    assert normalize_database_url(raw) == "postgresql+psycopg2://u:pw@db.example:5432/app"


def test_redis_url_is_the_broker_unless_celery_broker_url_overrides() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/3"})
    assert s.broker_url == "redis://127.0.0.1:6379/3"
    s = Settings.from_env(
        {"REDIS_URL": "redis://127.0.0.1:6379/3", "CELERY_BROKER_URL": "amqp://g:g@127.0.0.1//"}
    )
    assert s.broker_url == "amqp://g:g@127.0.0.1//"


def test_embedded_broker_sits_beside_the_sqlite_database(tmp_path) -> None:
    s = Settings.from_env({"DATABASE_URL": f"sqlite:///{tmp_path}/x/scans.db"})
    assert s.broker_url == f"sqla+sqlite:///{tmp_path}/x/scans-broker.db"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SCANQUEUE_CONCURRENCY": "two"}, "SCANQUEUE_CONCURRENCY"),
        ({"SCANQUEUE_CONCURRENCY": "0"}, "SCANQUEUE_CONCURRENCY"),
        ({"SCANQUEUE_MAX_CONCURRENCY": "1"}, "SCANQUEUE_MAX_CONCURRENCY"),
        ({"SCANQUEUE_POLL_EVERY": "fast"}, "SCANQUEUE_POLL_EVERY"),
        ({"SCANQUEUE_POLL_EVERY": "nan"}, "SCANQUEUE_POLL_EVERY"),
        ({"SCANQUEUE_LEASE_SECONDS": "-1"}, "SCANQUEUE_LEASE_SECONDS"),
        ({"SCANQUEUE_MAX_ATTEMPTS": "1.5"}, "SCANQUEUE_MAX_ATTEMPTS"),
        ({"SCANQUEUE_METRICS_PORT": "70000"}, "SCANQUEUE_METRICS_PORT"),
        ({"SCANQUEUE_RUNNER": "no_colon"}, "SCANQUEUE_RUNNER"),
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u:pw@h/db"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:notaport"}, "REDIS_URL"),
        ({"CELERY_BROKER_URL": "nonsense"}, "CELERY_BROKER_URL"),
        ({"SCANQUEUE_LOG_FORMAT": "xml"}, "SCANQUEUE_LOG_FORMAT"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert err.value.variable == variable
    assert str(err.value).startswith(variable + ":")
    assert "\n" not in str(err.value)


def test_bad_url_message_masks_the_password() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"DATABASE_URL": "mysql://user:hunter2@h/db"})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("postgresql://u:hunter2@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        (
            "rediss://default:hunter2@h:6380/0?ssl_cert_reqs=none",
            "rediss://default:***@h:6380/0?ssl_cert_reqs=none",
        ),
        ("amqp://guest:hunter2@h//", "amqp://guest:***@h//"),
        ("redis://hunter2@h:6379", "redis://***@h:6379"),
        ("sqlite:///scanqueue.db", "sqlite:///scanqueue.db"),
        ("postgresql://h/db?password=hunter2", "postgresql://h/db?password=***"),
    ],
)
def test_mask_url_hides_passwords(raw: str, masked: str) -> None:
    assert mask_url(raw) == masked
