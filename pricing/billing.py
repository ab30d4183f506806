"""How each cloud turns a machine's running time into billed time, and what it charges to store a GB a month.

A machine is billed from when it starts to when it stops, per second, with a minimum (and on some clouds in
whole increments). :func:`billed_seconds` applies a cloud's rule to one machine's whole life; the ledger
accrues running time as it goes and adds the difference (the *minimum* top-up) when the machine stops.

=========  =====================================  ================================================================
cloud      rule                                   source
=========  =====================================  ================================================================
aws        per second, 60 s minimum               https://aws.amazon.com/ec2/pricing/ (Linux per-second billing)
gcp        per second, 60 s minimum               https://cloud.google.com/compute/vm-instance-pricing
azure      per second, 60 s minimum               https://azure.microsoft.com/pricing/details/virtual-machines/
lambda     per minute (whole minutes, started     https://lambda.ai/pricing ("billed in one-minute increments")
           minutes count)
others     per second, no minimum                 (``local``, ``sim`` when not naming a cloud: nothing is billed)
=========  =====================================  ================================================================

Storage: each object store's first-tier standard-class list price per GB-month (GB = 2**30 bytes), for
volumes (:data:`STORAGE_USD_PER_GB_MONTH`). A local directory has no price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BillingRule:
    """``minimum_s``: the least a started machine is billed; ``increment_s``: billed time is rounded up to a
    multiple of it (1: per second)."""

    minimum_s: float = 0.0
    increment_s: float = 1.0
    source: str = ""

    def billed(self, seconds: float) -> float:
        """The seconds billed for a machine that ran ``seconds`` (from start to stop)."""
        if seconds <= 0:
            return 0.0
        s = max(seconds, self.minimum_s)
        if self.increment_s > 1:
            s = math.ceil(s / self.increment_s - 1e-9) * self.increment_s
        return s


PER_SECOND = BillingRule()
RULES: dict[str, BillingRule] = {
    "aws": BillingRule(60.0, 1.0, "https://aws.amazon.com/ec2/pricing/"),
    "gcp": BillingRule(60.0, 1.0, "https://cloud.google.com/compute/vm-instance-pricing"),
    "azure": BillingRule(60.0, 1.0, "https://azure.microsoft.com/pricing/details/virtual-machines/"),
    "lambda": BillingRule(60.0, 60.0, "https://lambda.ai/pricing"),
}

# USD per GB-month, standard storage class, first tier, the cheapest US region
STORAGE_USD_PER_GB_MONTH: dict[str, float] = {
    "aws": 0.023,  # S3 Standard, https://aws.amazon.com/s3/pricing/
    "gcp": 0.020,  # Cloud Storage Standard (us-central1), https://cloud.google.com/storage/pricing
    "azure": 0.0208,  # Blob Storage hot LRS, https://azure.microsoft.com/pricing/details/storage/blobs/
}


def rule_for(cloud: str | None) -> BillingRule:
    return RULES.get(cloud or "", PER_SECOND)


def billed_seconds(cloud: str | None, seconds: float) -> float:
    """The seconds ``cloud`` bills a machine that ran ``seconds``.

    >>> billed_seconds("aws", 12.5), billed_seconds("aws", 75.5), billed_seconds("lambda", 61)
    (60.0, 75.5, 120.0)
    """
    return rule_for(cloud).billed(seconds)
