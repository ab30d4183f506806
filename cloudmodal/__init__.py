"""cloudmodal: Modal's programming model on your own clouds.

```python
import cloudmodal

app = cloudmodal.App("hello")

@app.function(gpu=["H100", "A100-80GB"])
def square(x: int) -> int:
    return x * x
```

Importing this package stays light: no web framework, database, HTTP client or cloud SDK is imported here.
"""

from __future__ import annotations

from typing import Any

from cloudmodal import exception
from cloudmodal._context import current_call_id as _current_call_id
from cloudmodal._context import current_input_id as _current_input_id
from cloudmodal.app import App
from cloudmodal.budget import Budget
from cloudmodal.cloud_bucket_mount import CloudBucketMount
from cloudmodal.dict import Dict
from cloudmodal.exception import Error
from cloudmodal.functions import Cls, Function, FunctionCall
from cloudmodal.image import Image
from cloudmodal.output import enable_output
from cloudmodal.partial_function import (
    asgi_app,
    batched,
    concurrent,
    enter,
    exit,
    fastapi_endpoint,
    method,
    parameter,
    web_endpoint,
    web_server,
    wsgi_app,
)
from cloudmodal.queue import Queue
from cloudmodal.retries import Retries
from cloudmodal.sandbox import Sandbox
from cloudmodal.schedule import Cron, Period
from cloudmodal.secret import Secret
from cloudmodal.volume import Volume

__version__ = "0.1.0"

__all__ = [
    "App",
    "Budget",
    "CloudBucketMount",
    "Cls",
    "Cron",
    "Dict",
    "Error",
    "Function",
    "FunctionCall",
    "Image",
    "Period",
    "Queue",
    "Retries",
    "Sandbox",
    "Secret",
    "Volume",
    "asgi_app",
    "batched",
    "concurrent",
    "current_function_call_id",
    "current_input_id",
    "enable_output",
    "enter",
    "exception",
    "exit",
    "fastapi_endpoint",
    "is_local",
    "method",
    "parameter",
    "web_endpoint",
    "web_server",
    "wsgi_app",
]


def is_local() -> bool:
    """True on the machine that runs ``cloudmodal run``/``deploy``; False inside a worker."""
    from cloudmodal.settings import settings

    return not settings().is_remote


def current_input_id() -> str | None:
    """The id of the input being processed (inside a worker), else None."""
    return _current_input_id.get()


def current_function_call_id() -> str | None:
    """The id of the function call (``fc-…``) being processed (inside a worker), else None."""
    return _current_call_id.get()


def __getattr__(name: str) -> Any:
    if name == "Stub":
        raise AttributeError(
            "cloudmodal.Stub does not exist: Modal renamed Stub to App. Use cloudmodal.App instead, "
            "e.g. `app = cloudmodal.App('my-app')`."
        )
    raise AttributeError(f"module 'cloudmodal' has no attribute {name!r}")
