"""A local Ray started by raycompress (`resources.init_ray`, no address): every port its processes
listen on is on loopback, and it has its own dashboard/API port, which its workers' State API
reaches even when another process holds Ray's default 8265. The Ray runs in a subprocess, apart
from the session's Ray."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, socket
    import psutil, ray
    from raycompress.config import RayConfig
    from raycompress.distributed.resources import init_ray

    blocker = socket.socket()  # "another Ray's dashboard" on the default port
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        blocker.bind(("127.0.0.1", 8265))
        blocker.listen()
    except OSError:
        pass  # something else holds 8265 already: the same situation
    init_ray(RayConfig(num_cpus=1))

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return os.getpid()

    @ray.remote(num_cpus=0)
    def state_of(actor_id):  # what Ray Train's placement-group cleaner asks, from a worker
        from ray.util.state import get_actor
        found = get_actor(actor_id, timeout=60)
        return {"env": os.environ.get("RAY_API_SERVER_ADDRESS"), "state": found.state if found else None}

    probe = Probe.remote()
    ray.get(probe.ping.remote())
    seen = ray.get(state_of.remote(probe._actor_id.hex()))
    me = psutil.Process()
    pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
    listening = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in psutil.net_connections("inet")
                        if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.port != 8265})
    import ray.experimental.internal_kv as kv
    from ray._private import ray_constants as rc
    node = ray._private.worker._global_node
    print("RESULT " + json.dumps({
        "listening": listening, "node_ip": node.node_ip_address, "webui": node.address_info["webui_url"],
        "kv_dashboard": kv._internal_kv_get(rc.DASHBOARD_ADDRESS, namespace=rc.KV_NAMESPACE_DASHBOARD).decode(),
        "worker": seen}))
    ray.shutdown()
""")


def _loopback(ip: str) -> bool:
    return ip == "::1" or ip.removeprefix("::ffff:").startswith("127.")


@pytest.fixture(scope="module")
def local_ray():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.integration
def test_every_port_of_a_local_ray_is_on_loopback(local_ray):
    listening = local_ray["listening"]
    names = {name for _, _, name in listening}
    # GCS, raylet, the driver and a worker, the agents: all found, all on loopback
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), listening
    assert local_ray["node_ip"] == "127.0.0.1"
    assert [p for p in listening if not _loopback(p[0])] == [], listening


@pytest.mark.integration
def test_a_local_ray_has_its_own_dashboard_address(local_ray):
    host, port = local_ray["webui"].rsplit(":", 1)
    assert _loopback(host) and int(port) != 8265  # 8265 is held by another process
    assert local_ray["kv_dashboard"] == local_ray["webui"]  # what Ray's State API clients look up
    # a worker's State API reaches this Ray's dashboard and finds this Ray's actor alive
    assert local_ray["worker"] == {"env": f"http://127.0.0.1:{port}", "state": "ALIVE"}
