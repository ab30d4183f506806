"""Functions for tests/integration/test_placement_locality.py: one mounts a volume, one only a small directory
of it, one nothing; all want the same GPU and keep a worker up (so each pool launches one at once)."""

import cloudmodal

app = cloudmodal.App("placement-locality")
data = cloudmodal.Volume.from_name("locality-data", create_if_missing=True)


@app.function(gpu="H100", volumes={"/mnt/cloudmodal-test-locality": data}, min_containers=1)
def near(x: int) -> int:
    return x


@app.function(gpu="H100", min_containers=1)
def anywhere(x: int) -> int:
    return x


@app.function(
    gpu="H100",
    volumes={"/mnt/cloudmodal-test-locality-small": data.with_mount_options(sub_path="small")},
    min_containers=1,
)
def small(x: int) -> int:
    return x
