"""distributed.resources.init_ray: a local-cluster setting is ignored when joining a cluster."""
from __future__ import annotations

import logging

import pytest

from raycompress.config import RayConfig
from raycompress.distributed import resources


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    return calls


def test_joining_via_ray_address_ignores_num_cpus(fake_ray, monkeypatch, caplog):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with caplog.at_level(logging.INFO, logger=resources.__name__):
        resources.init_ray(RayConfig(num_cpus=2))
    assert fake_ray[0]["address"] == "127.0.0.1:6379" and "num_cpus" not in fake_ray[0]
    assert "ray.num_cpus=2" in caplog.text and "ignored" in caplog.text


def test_local_cluster_gets_num_cpus(fake_ray, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    resources.init_ray(RayConfig(num_cpus=2))
    # "local": a fresh Ray, never a `ray start` head or a test Cluster found via ray_current_cluster
    assert fake_ray[0]["num_cpus"] == 2 and fake_ray[0]["address"] == "local"


def test_config_address_wins(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "elsewhere:1")
    resources.init_ray(RayConfig(address="auto", num_cpus=2))
    assert fake_ray[0]["address"] == "auto"
