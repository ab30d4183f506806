"""Stands in for a package that only the image has: importing it fails outside a worker."""

import os

if os.environ.get("CLOUDMODAL_IS_REMOTE") != "1":
    raise ImportError("remote_only is installed in the image only")

VALUE = 42
