"""Bundled emulator of the CutMeShort `POST /track/lead` API for the demo, tests and benchmarks.

Run it with `python -m cutmeshort_sandbox --port 8765` (see `--help`), or in-process:

    with SandboxServer(port=0, token="t") as sandbox:
        ...  # send leads to f"{sandbox.url}/track/lead"

Control and inspection routes, without auth: `GET|POST /_sandbox/faults`,
`POST /_sandbox/reset`, `GET /_sandbox/requests`, `GET /_sandbox/leads`,
`GET /_sandbox/stats`.
"""

from .server import SandboxServer

__all__ = ["SandboxServer"]
