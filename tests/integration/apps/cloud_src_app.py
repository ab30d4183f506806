"""Functions on cloud nodes that import a local package (``cmsrc_pkg``, made by the test in a directory of its
own): one with ``Image.add_local_python_source`` (the package is shipped with the node's bootstrap), one
without (the negative control: the import fails on the node)."""

import cloudmodal

app = cloudmodal.App("cloud-src-app")

with_image = cloudmodal.Image.debian_slim().add_local_python_source("cmsrc_pkg.sub")


@app.function(gpu="H100:8", spot="never", image=with_image)
def with_source() -> dict:
    import cmsrc_pkg.sub

    return {"value": cmsrc_pkg.sub.VALUE, "file": cmsrc_pkg.sub.__file__}


@app.function(gpu="H100:8", spot="never")
def without_source() -> str:
    try:
        import cmsrc_pkg.sub  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return "imported"
