"""`cloudmodal run uv_sync_app.py`: an image from a uv project (`Image.uv_sync`), as in Modal's guide
("Images": "uv_sync"). Its one dependency is one the host has, so the local provider needs no download."""

from pathlib import Path

import cloudmodal

image = cloudmodal.Image.debian_slim().uv_sync(Path(__file__).parent / "uvproj")
app = cloudmodal.App("conformance-uv-sync", image=image)


@app.function()
def version() -> str:
    import packaging

    return packaging.__version__


@app.local_entrypoint()
def main() -> None:
    print("packaging in the image:", bool(version.remote()))
