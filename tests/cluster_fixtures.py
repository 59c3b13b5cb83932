"""Session-wide real servers for the object-store and multi-node tests: moto's S3 API server and a
two-node Ray cluster (head + `ray start --address`, 1 CPU each, token auth on), started once.

    pytest_plugins = ["tests.cluster_fixtures"]   # in a test module

`s3_env` puts the AWS_* variables of the S3 server into this test's environment, `cluster_env` also
RAY_ADDRESS and RAY_AUTH_TOKEN (per test: other tests must not join the cluster by accident).
"""

from __future__ import annotations

import pytest

from cluster.localcluster import LocalRayCluster, S3Server


@pytest.fixture(scope="session")
def s3_server():
    with S3Server(bucket="megaclass-test") as server:
        yield server


@pytest.fixture(scope="session")
def two_nodes(s3_server):
    with LocalRayCluster(num_nodes=2, cpus_per_node=1, extra_env=s3_server.env) as cluster:
        yield cluster


def _apply(env: dict[str, str], monkeypatch) -> dict[str, str]:
    import fsspec

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fsspec.filesystem("s3").invalidate_cache()  # listings cached by an earlier test are stale now
    return env


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS_* variables that point s3fs at the server, in this test's environment; returns them."""
    return _apply(dict(s3_server.env), monkeypatch)


@pytest.fixture
def cluster_env(s3_server, two_nodes, monkeypatch):
    """What a user sets to work against the cluster and the bucket (RAY_ADDRESS, RAY_AUTH_TOKEN, AWS_*).
    Both nodes are alive when the test starts, whatever an earlier test left behind."""
    two_nodes.restore()
    return _apply({**s3_server.env, **two_nodes.env}, monkeypatch)
