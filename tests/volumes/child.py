"""A committer in its own process, for the conformance suite's crash and race cases.

Run as ``python tests/volumes/child.py '<json>'`` with the store's variables in the environment. The JSON
says which volume (``store``, ``head``), what to change and where to pause:

- ``pause_at``: ``"swap"`` (manifest written, head not yet swapped) or ``"blob"`` (after ``pause_after`` parts
  were stored): the child touches ``marker`` and waits for ``release`` to exist (no ``release``: waits until
  killed — the SIGKILL case);
- ``barrier``: files; before its first swap the child touches the first and waits for all of them, so two
  committers reach the swap together and one must lose the race.

The waits poll the file system with a deadline, so a child whose parent died exits on its own. The pausing
wrappers sit on the engine's two seams (ObjectStore, Head); the engine itself runs unchanged.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cloudmodal.volumes import FileHead, ObjectStore, VolumeData, open_store  # noqa: E402

DEADLINE_S = 60.0


def wait_for(paths: list[str]) -> None:
    end = time.monotonic() + DEADLINE_S
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > end:
            sys.exit(f"child: gave up waiting for {paths}")
        time.sleep(0.01)


def pause(marker: str, release: str | None) -> None:
    Path(marker).touch()
    if release is None:
        time.sleep(DEADLINE_S)  # the parent SIGKILLs us here
        sys.exit("child: was not killed")
    wait_for([release])


class PausingStore:
    def __init__(self, inner: ObjectStore, after: int, marker: str, release: str | None) -> None:
        self.inner, self.url = inner, inner.url
        self.after, self.marker, self.release = after, marker, release
        self.blob_puts = 0

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        self.inner.put(key, data)
        if key.startswith("blobs/"):
            self.blob_puts += 1
            if self.blob_puts == self.after:
                pause(self.marker, self.release)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def open_read(self, key: str) -> Any:
        return self.inner.open_read(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str) -> Any:
        return self.inner.list(prefix)

    def list_modified(self, prefix: str) -> Any:
        return self.inner.list_modified(prefix)


class PausingHead:
    def __init__(self, inner: FileHead, args: dict[str, Any]) -> None:
        self.inner, self.args = inner, args
        self.swaps = 0

    def read(self) -> tuple[int, str | None]:
        return self.inner.read()

    def swap(self, expected: int, manifest_key: str) -> bool:
        self.swaps += 1
        if self.swaps == 1 and self.args.get("barrier"):
            Path(self.args["barrier"][0]).touch()
            wait_for(self.args["barrier"])
        if self.swaps == 1 and self.args.get("pause_at") == "swap":
            pause(self.args["marker"], self.args.get("release"))
        return self.inner.swap(expected, manifest_key)


def main() -> None:
    args = json.loads(sys.argv[1])
    store: ObjectStore = open_store(args["store"])
    if args.get("pause_at") == "blob":
        store = PausingStore(store, int(args.get("pause_after", 1)), args["marker"], args.get("release"))
    head = PausingHead(FileHead(args["head"]), args)
    data = VolumeData(store, head, part_size=int(args.get("part_size", 64 * 1024)))
    if args["mode"] == "working_copy":
        # Edit a mount of the version the parent prepared, then commit it.
        wc = data.working_copy(Path(args["workdir"]))
        for path, text in args.get("writes", {}).items():
            target = Path(args["workdir"]) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(text.encode() * int(args.get("repeat", 1)))
        for path in args.get("deletes", []):
            (Path(args["workdir"]) / path).unlink()
        version = wc.commit()
    else:
        batch = data.batch()
        for path, text in args.get("writes", {}).items():
            batch.put_file(io.BytesIO(text.encode() * int(args.get("repeat", 1))), path)
        version = batch.commit()
    print(json.dumps({"version": version, "swaps": head.swaps}), flush=True)
    data.close()


if __name__ == "__main__":
    main()
