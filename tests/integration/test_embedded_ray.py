"""The embedded Ray of a local run listens on every interface (Ray has no setting to bind it to loopback), so
its token authentication is what keeps others out: a client without this machine's token is refused for it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import REPO

JOIN = ("import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print('joined', int(ray.cluster_resources()['CPU']))")
HOLD = ("import sys, ray; from llmbatch.cluster.connect import start_local_ray; start_local_ray(); "
        "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")


def _join(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", JOIN, address], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_client_without_the_token_cannot_join_the_embedded_ray(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = holder.stdout.readline().strip()
        host = address.rsplit(":", 1)[0]
        assert address and host not in ("127.0.0.1", "localhost"), address
        (tmp_path / "home").mkdir()
        stranger = _join(address, {**env, "HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled"})
        assert stranger.returncode != 0 and "InvalidAuthToken" in stranger.stderr, stranger.stderr[-3000:]
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
