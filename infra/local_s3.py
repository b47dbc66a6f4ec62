"""A local S3-compatible server (moto's server mode on 127.0.0.1) for tests and benchmarks.

Clients find it only through the standard variables (``AWS_ENDPOINT_URL``, the key variables,
and ``S3_ENDPOINT_URL`` for mosaicml-streaming), exactly as they would find a real store.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import IO

__all__ = ["start_local_s3"]


def start_local_s3(bucket: str, *, log: IO | None = None,
                   timeout_s: float = 60.0) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start moto's S3 server on a free port, create ``bucket``; returns the process and the
    environment variables that point clients at it (the caller sets them and stops the process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the local S3 server did not start (rc={proc.poll()})") from None
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return proc, env
