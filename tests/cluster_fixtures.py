"""Session-wide real servers for the object-store and multi-node tests: moto's S3 API server and a
two-node Ray cluster (head + `ray start --address`, 1 CPU each, token auth on), started once.

    from tests.cluster_fixtures import cluster_env, s3_server, two_nodes  # noqa: F401 (fixtures)

`cluster_env` puts RAY_ADDRESS, RAY_AUTH_TOKEN and the AWS_* variables of the S3 server into this
test's environment only (other tests must not join the cluster by accident).
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


@pytest.fixture
def cluster_env(s3_server, two_nodes, monkeypatch):
    """The environment a user sets to work against the cluster and the bucket; returns it as a dict."""
    import fsspec

    env = {**s3_server.env, **two_nodes.env}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fsspec.filesystem("s3").invalidate_cache()  # listings cached by an earlier test are stale now
    return env
