"""What moving a volume's data to a worker costs: published data-transfer (egress) rates, and where data is.

A cloud bills the bytes that leave it (its *egress*), by where they go: nothing within one region, a small
rate to another region of the same cloud, the most to the internet, which is how another cloud's machine
reads them. Ingress is free everywhere, so the rate is the source's, whatever the destination cloud.

- :data:`DEFAULT_RATES`: each cloud's first-tier list rates in USD per GB (the clouds bill GB as 2**30 bytes),
  with the page each comes from. ``<catalog dir>/egress.csv`` replaces them cloud by cloud
  (:func:`load_rates`; columns ``cloud,same_region,inter_region,internet``), for negotiated rates or
  new list prices.
- :class:`DataLocation`: where data is (a cloud and region, ``local`` for a directory on the control plane's
  machine, or unknown). :func:`store_location` reads it from a volume store's URL and the
  ``CLOUDMODAL_VOLUME_STORE_REGION`` setting.
- :func:`egress_cost`: the USD one read of ``gb`` costs from a location to a cloud region. Pure.

Simplifications, on purpose: one inter-region rate per cloud (the same-continent one; crossing an ocean costs
more on every cloud), no free monthly allowance (100–200 GB on the big three) and no volume tiers: the figure
ranks offers against each other, it is not an invoice.

>>> egress_cost(DataLocation("aws", "us-east-1"), "aws", "us-west-2", 100)
2.0
>>> egress_cost(DataLocation("aws", "us-east-1"), "gcp", "us-central1", 100)
9.0
>>> egress_cost(DataLocation("aws", "us-east-1"), "aws", "us-east-1", 100)
0.0
"""

from __future__ import annotations

import csv
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cloudmodal.exception import InvalidError

__all__ = [
    "DEFAULT_RATES",
    "EGRESS_FILE",
    "GIB",
    "LOCAL",
    "DataLocation",
    "EgressRate",
    "custom_endpoint",
    "egress_cost",
    "egress_rate",
    "load_rates",
    "parse_location",
    "store_location",
]

GIB = 1024**3  # the GB the clouds bill transfer in
LOCAL = "local"  # a directory on the control plane's machine: reading it from there costs nothing
EGRESS_FILE = "egress.csv"  # beside the offer catalog: replaces DEFAULT_RATES for the clouds it lists

# Which cloud a store URL's scheme names (a custom endpoint can make it another service: see store_location).
_SCHEME_CLOUD = {"s3": "aws", "gs": "gcp", "gcs": "gcp", "az": "azure", "azure": "azure", "abfs": "azure"}


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressRate:
    """One cloud's data-transfer-out rates, USD per GB; ``source``: where they were read."""

    same_region: float  # to a machine in the same region (object store → VM: free on every cloud here)
    inter_region: float  # to another region of the same cloud
    internet: float  # out of the cloud: to the internet, so to any other cloud
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("same_region", "inter_region", "internet"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v < 0 or v != v:
                raise InvalidError(f"Invalid egress rate {name}={v!r}: give USD per GB, 0 or more.")


# First-tier list rates (after any free allowance), USD per GB. Transcribed on 2026-12-06 from the pages below
# as quoted by current third-party summaries (this machine cannot reach the pages themselves); they have been
# these figures since 2023. Override with <catalog dir>/egress.csv when yours differ.
DEFAULT_RATES: Mapping[str, EgressRate] = {
    # https://aws.amazon.com/s3/pricing/ ("Data transfer" tab) and
    # https://aws.amazon.com/ec2/pricing/on-demand/#Data_Transfer: S3 → EC2 in the same region free; to another
    # AWS region $0.02/GB (US and EU sources); to the internet $0.09/GB for the first 10 TB a month (US regions).
    "aws": EgressRate(same_region=0.0, inter_region=0.02, internet=0.09, source="aws.amazon.com/s3/pricing"),
    # https://cloud.google.com/storage/pricing#network-pricing: within a region free; between regions of one
    # continent (Northern America) $0.02/GB; to the internet, premium tier, first TB $0.12/GB.
    "gcp": EgressRate(
        same_region=0.0, inter_region=0.02, internet=0.12, source="cloud.google.com/storage/pricing"
    ),
    # https://azure.microsoft.com/en-us/pricing/details/bandwidth/: within a region free; between regions of
    # North America or Europe $0.02/GB; to the internet (Microsoft's network) $0.087/GB after the first 100 GB.
    "azure": EgressRate(
        same_region=0.0,
        inter_region=0.02,
        internet=0.087,
        source="azure.microsoft.com/en-us/pricing/details/bandwidth",
    ),
    # https://lambda.ai/pricing: Lambda Cloud charges no egress (nor ingress).
    "lambda": EgressRate(same_region=0.0, inter_region=0.0, internet=0.0, source="lambda.ai/pricing"),
    # A directory on the control plane's machine: what a worker there reads costs nothing.
    LOCAL: EgressRate(same_region=0.0, inter_region=0.0, internet=0.0, source="local directory"),
}


@dataclass(frozen=True, slots=True)
class DataLocation:
    """Where data is: ``cloud`` and ``region`` (either None: not known), and ``why`` when it is not known.

    ``DataLocation("aws", None)``: in AWS, region unknown. ``DataLocation("local", None)``: a directory on the
    control plane's machine. ``DataLocation(None, None, "…")``: unknown.
    """

    cloud: str | None
    region: str | None = None
    why: str = ""  # for an unknown cloud or region: what is missing and how to say it

    @property
    def known(self) -> bool:
        """Whether egress can be priced fully (a local directory needs no region)."""
        return self.cloud == LOCAL or (self.cloud is not None and self.region is not None)

    def __str__(self) -> str:
        if self.cloud is None:
            return "unknown"
        if self.cloud == LOCAL:
            return LOCAL
        return f"{self.cloud}:{self.region or '?'}"


def parse_location(text: str, *, what: str = "location") -> DataLocation:
    """``"aws:us-east-1"`` → ``DataLocation("aws", "us-east-1")``; ``"local"`` → the local directory."""
    t = text.strip().lower()
    if t == LOCAL:
        return DataLocation(LOCAL)
    cloud, sep, region = t.partition(":")
    if not sep or not cloud or not region or ":" in region:
        raise InvalidError(
            f"Invalid {what} {text!r}: write CLOUD:REGION, e.g. aws:us-east-1, gcp:us-central1 or "
            "azure:eastus (or `local` for a directory on the control plane's machine)."
        )
    return DataLocation(cloud, region)


def store_location(url: str, region: str | None = None, *, custom_endpoint: bool = False) -> DataLocation:
    """Where a volume store's data is, from its URL and an explicit ``region`` (``CLOUD:REGION``).

    ``region`` wins when given. Otherwise a directory is :data:`LOCAL`; a bucket URL names its cloud by its
    scheme (``s3://`` AWS, ``gs://`` GCP, ``az://`` Azure) but never its region; and with ``custom_endpoint``
    (``AWS_ENDPOINT_URL``, a GCS emulator, an Azure connection string with its own endpoint) the scheme says
    nothing about the cloud, so the location is unknown.

    >>> store_location("s3://bucket/volumes", "aws:eu-west-1")
    DataLocation(cloud='aws', region='eu-west-1', why='')
    >>> str(store_location("s3://bucket/volumes"))
    'aws:?'
    >>> store_location("/srv/volumes").cloud
    'local'
    """
    if region:
        return parse_location(region, what="CLOUDMODAL_VOLUME_STORE_REGION")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # a path (C: on Windows)
        return DataLocation(LOCAL)
    hint = "set CLOUDMODAL_VOLUME_STORE_REGION=CLOUD:REGION on the control plane"
    if custom_endpoint:
        return DataLocation(None, None, f"{scheme}:// at a custom endpoint: {hint}")
    cloud = _SCHEME_CLOUD.get(scheme)
    if cloud is None:
        return DataLocation(None, None, f"no cloud known for {scheme}:// stores: {hint}")
    return DataLocation(cloud, None, f"the bucket's region is not in its URL: {hint}")


def custom_endpoint(url: str, environ: Mapping[str, str]) -> bool:
    """Whether the store at ``url`` is reached at an endpoint of the user's (MinIO, an emulator), so its scheme
    does not name the cloud it is in: the variables :func:`cloudmodal.volumes.store.open_store` reads."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "s3":
        return bool(environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"))
    if scheme in ("gs", "gcs"):
        return bool(environ.get("STORAGE_EMULATOR_HOST"))
    if scheme in ("az", "azure", "abfs"):
        return "blobendpoint=" in environ.get("AZURE_STORAGE_CONNECTION_STRING", "").lower()
    return False


def egress_rate(
    src: DataLocation, dst_cloud: str, dst_region: str, rates: Mapping[str, EgressRate] = DEFAULT_RATES
) -> float | None:
    """USD per GB to move data from ``src`` to a machine in ``dst_cloud``/``dst_region``; None when it cannot
    be told (unknown source, a source cloud without rates, or the same cloud with the source region unknown)."""
    if src.cloud is None:
        return None
    rate = rates.get(src.cloud)
    if src.cloud == LOCAL:
        return rate.internet if rate is not None else 0.0
    if rate is None:
        return None
    if src.cloud != dst_cloud:
        return rate.internet
    if src.region is None:
        return None  # same cloud: free or inter-region, depending on the region nobody told us
    return rate.same_region if src.region == dst_region else rate.inter_region


def egress_cost(
    src: DataLocation,
    dst_cloud: str,
    dst_region: str,
    gb: float,
    rates: Mapping[str, EgressRate] = DEFAULT_RATES,
) -> float:
    """USD to move ``gb`` GB from ``src`` to a machine in ``dst_cloud``/``dst_region``. What cannot be told
    (see :func:`egress_rate`) costs 0: an unknown location is never a penalty."""
    if gb < 0:
        raise InvalidError(f"Invalid data size {gb!r} GB: give 0 or more.")
    rate = egress_rate(src, dst_cloud, dst_region, rates)
    return 0.0 if rate is None or gb == 0 else rate * gb


def load_rates(path: Path | None, base: Mapping[str, EgressRate] = DEFAULT_RATES) -> Mapping[str, EgressRate]:
    """``base`` with the clouds ``path`` lists replaced (``cloud,same_region,inter_region,internet`` CSV with a
    header; ``#`` lines are comments). A missing file (or None) gives ``base``; a bad one raises
    :class:`InvalidError` naming the file and line."""
    if path is None or not path.is_file():
        return base
    out = dict(base)
    want = ("cloud", "same_region", "inter_region", "internet")
    with path.open(newline="", encoding="utf-8") as f:
        lines = (line for line in f if not line.lstrip().startswith("#"))
        reader = csv.DictReader(lines)
        missing = [c for c in want if c not in (reader.fieldnames or ())]
        if missing:
            raise InvalidError(
                f"{path}: missing column(s) {', '.join(missing)}; the header is {','.join(want)} (USD per GB)."
            )
        for n, row in enumerate(reader, start=1):
            cloud = (row["cloud"] or "").strip().lower()
            try:
                if not cloud:
                    raise ValueError("empty cloud")
                out[cloud] = EgressRate(
                    same_region=float(row["same_region"]),
                    inter_region=float(row["inter_region"]),
                    internet=float(row["internet"]),
                    source=str(path),
                )
            except (TypeError, ValueError, InvalidError) as e:
                raise InvalidError(
                    f"{path}, data row {n}: {e}. Each row is CLOUD,SAME_REGION,INTER_REGION,INTERNET in USD per GB."
                ) from None
    return out
