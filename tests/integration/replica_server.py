"""One control-plane replica as a process of its own, for the failover tests: ``python replica_server.py
STATE_DIR PUBLIC_URL``. The database, secret key file and blob directory come from the environment
(``CLOUDMODAL_DATABASE_URL``, ``CLOUDMODAL_SECRET_KEY_FILE``, ``CLOUDMODAL_BLOB_DIR``), shared by the
replicas; ``PUBLIC_URL`` is their one address (the proxy in front of them), which this replica's workers are
given. It listens on a free port of 127.0.0.1 and prints ``LISTENING <its own url>`` once it serves. What
``cloudmodal server start --foreground`` does, with the test's short leases and timeouts."""

from __future__ import annotations

import sys
from pathlib import Path

from cloudmodal.server.app import ServerHandle, default_settings


def main() -> None:
    state_dir, public_url = Path(sys.argv[1]), sys.argv[2]
    settings = default_settings(
        state_dir,
        public_url=public_url,
        lease_s=6.0,
        heartbeat_s=0.5,
        worker_timeout_s=10.0,
        client_timeout_s=60.0,
        reconcile_interval_s=0.1,
        worker_reconnect_s=60.0,  # workers left without any control plane give up within a minute
    )
    handle = ServerHandle(settings, host="127.0.0.1", port=0)
    print(f"LISTENING {handle.url}", flush=True)  # the socket is bound and listening already
    handle.serve_forever()


if __name__ == "__main__":
    main()
