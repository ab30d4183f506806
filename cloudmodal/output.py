"""``cloudmodal.enable_output()``: show worker logs and map progress in a program that runs an app itself
(``with app.run():`` in a ``python script.py`` program). ``cloudmodal run`` turns it on for you."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["enable_output"]


@contextlib.contextmanager
def enable_output(show_progress: bool = True) -> Iterator[None]:
    """Print the app's worker logs (and ``.map`` progress) while the block runs:

    ```python
    if __name__ == "__main__":
        with cloudmodal.enable_output():
            with app.run():
                print(square.remote(4))
    ```

    ``show_progress`` is accepted for Modal compatibility; progress follows the same switch as the logs.
    """
    from cloudmodal.client.session import enable_output as _enable  # the client loads on first use only

    with _enable():
        yield
