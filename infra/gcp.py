"""The standing infrastructure on GCP, as a Pulumi program (``program``).

What it makes, every resource that takes labels labelled ``cloudmodal-infra`` (the provider's
``default_labels`` too); firewall rules, IAM bindings and subnetworks take none:

- **the bucket** ``<project>-<name>-store`` (a project id is globally unique, so the bucket name is too) for
  volumes and blobs: uniform bucket-level access (no object ACLs) with public access prevention enforced,
  versioning, and lifecycle rules: deleted blobs (noncurrent versions under ``blobs/``) gone after
  ``blob_expiry_days``, overwritten or deleted volume files after ``NONCURRENT_EXPIRY_DAYS``, database backups
  after ``BACKUP_EXPIRY_DAYS``, incomplete multipart uploads after a day. Encryption: Google-managed keys,
  which GCS applies to every object always; a customer-managed (CMEK) key would add a KMS key ring to keep
  and pay for, and changes nothing about who may read — so none is configured;
- **the workers' identity**: a service account with one binding, ``roles/storage.objectAdmin`` on this bucket
  (a bucket-level IAM member); no project-level role at all. Its email is ``worker_identity``;
- **the network** ``<name>-net`` (custom mode, one subnetwork in the region with Private Google Access):
  firewall rules allow SSH only from ``control_plane_cidrs`` (and from the control host, by its network tag),
  traffic within the subnetwork, nothing else in. Egress is GCP's implied allow-all;
- **with ``with_control_host``**: an e2-small Ubuntu VM with a static address, Shielded VM, project-wide SSH
  keys blocked, its own service account bound to the same bucket only, the control plane's port open to the
  world on its network tag alone, SSH to it only from ``admin_cidrs``, and **PostgreSQL on the host** (why
  there rather than Cloud SQL: as on AWS — one cheap host, peer authentication over a Unix socket, nightly
  ``pg_dump`` to ``backups/``; see ``infra/aws.py``).
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from .common import (
    ABORT_MULTIPART_DAYS,
    SSH_PORT,
    InfraConfig,
    LifecycleRule,
    control_host_user_data,
    export_control_host,
    export_outputs,
    lifecycle_rules,
    resource_tags,
)

SUBNET_CIDR = "10.74.0.0/20"
WORKER_BUCKET_ROLE = "roles/storage.objectAdmin"  # objects only: no bucket settings, no IAM
CONTROL_HOST_TYPE = "e2-small"
CONTROL_HOST_IMAGE = "ubuntu-os-cloud/ubuntu-2404-lts-amd64"


def program(cfg: InfraConfig) -> None:
    cfg.validate()
    assert cfg.project is not None  # validate() refuses gcp without one
    n = cfg.name
    region = cfg.resolved_region
    labels = resource_tags()
    provider = gcp.Provider(f"{n}-gcp", project=cfg.project, region=region, default_labels=labels)
    opts = pulumi.ResourceOptions(provider=provider)

    # --- the bucket ---------------------------------------------------------------------------------------
    def delete_rule(rule: LifecycleRule) -> gcp.storage.BucketLifecycleRuleArgs:
        # GCS's age counts from an object's creation, for noncurrent versions too: a rule that deletes current
        # objects by age is one Delete of any state at that age (``noncurrent_days`` is not expressed)
        if rule.current_days is None:
            condition = gcp.storage.BucketLifecycleRuleConditionArgs(
                matches_prefixes=[f"{rule.prefix}/"],
                with_state="ARCHIVED",
                days_since_noncurrent_time=rule.noncurrent_days,
            )
        else:
            condition = gcp.storage.BucketLifecycleRuleConditionArgs(
                matches_prefixes=[f"{rule.prefix}/"], age=rule.current_days, with_state="ANY"
            )
        return gcp.storage.BucketLifecycleRuleArgs(
            action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"), condition=condition
        )

    def bucket_account(kind: str, display_name: str) -> gcp.serviceaccount.Account:
        """A service account ``<name>-<kind>`` with one role, on the bucket only."""
        account = gcp.serviceaccount.Account(
            f"{n}-{kind}",
            account_id=f"{n}-{kind}",
            display_name=display_name,
            description="reads and writes the cloudmodal bucket, nothing else",
            project=cfg.project,
            opts=opts,
        )
        gcp.storage.BucketIAMMember(
            f"{n}-{kind}-bucket",
            bucket=bucket.name,
            role=WORKER_BUCKET_ROLE,
            member=account.email.apply(lambda e: f"serviceAccount:{e}"),
            opts=pulumi.ResourceOptions(provider=provider, parent=bucket),
        )
        return account

    bucket = gcp.storage.Bucket(
        f"{n}-store",
        name=f"{cfg.project}-{n}-store",
        location=region.upper(),
        uniform_bucket_level_access=True,
        public_access_prevention="enforced",
        versioning=gcp.storage.BucketVersioningArgs(enabled=True),
        lifecycle_rules=[
            *(delete_rule(rule) for rule in lifecycle_rules(cfg)),
            gcp.storage.BucketLifecycleRuleArgs(
                action=gcp.storage.BucketLifecycleRuleActionArgs(type="AbortIncompleteMultipartUpload"),
                condition=gcp.storage.BucketLifecycleRuleConditionArgs(age=ABORT_MULTIPART_DAYS),
            ),
        ],
        labels=labels,
        opts=opts,
    )

    # --- the workers' identity ------------------------------------------------------------------------------
    worker = bucket_account("worker", "cloudmodal workers")

    # --- the network ------------------------------------------------------------------------------------------
    network = gcp.compute.Network(
        f"{n}-net", name=f"{n}-net", auto_create_subnetworks=False, project=cfg.project, opts=opts
    )
    net = pulumi.ResourceOptions(provider=provider, parent=network)
    subnet = gcp.compute.Subnetwork(
        f"{n}-subnet",
        name=f"{n}-subnet",
        network=network.id,
        region=region,
        ip_cidr_range=SUBNET_CIDR,
        private_ip_google_access=True,
        opts=net,
    )
    control_tag = f"{n}-control"

    def ingress(
        kind: str,
        ports: list[str] | None,
        source_ranges: list[str],
        protocol: str = "tcp",
        target_tags: list[str] | None = None,
    ) -> None:
        gcp.compute.Firewall(
            f"{n}-{kind}",
            name=f"{n}-{kind}",
            network=network.id,
            direction="INGRESS",
            allows=[gcp.compute.FirewallAllowArgs(protocol=protocol, ports=ports)],
            source_ranges=source_ranges,
            target_tags=target_tags,
            opts=net,
        )

    ingress("internal", None, [SUBNET_CIDR], protocol="all")
    if cfg.control_plane_cidrs:
        ingress("ssh-from-control-plane", [str(SSH_PORT)], source_ranges=cfg.ssh_cidrs())
    if cfg.with_control_host:
        # the subnetwork's own range (above) already lets the control host SSH to workers
        ingress(
            "control-plane",
            [str(cfg.control_plane_port)],
            source_ranges=["0.0.0.0/0"],
            target_tags=[control_tag],
        )
        if cfg.admin_cidrs:
            ingress(
                "ssh-admin", [str(SSH_PORT)], source_ranges=cfg.admin_ssh_cidrs(), target_tags=[control_tag]
            )

    export_outputs(
        cfg,
        bucket_url=bucket.name.apply(lambda b: f"gs://{b}"),
        worker_identity=worker.email,
        network=network.name,
    )
    pulumi.export("subnetwork", subnet.name)

    if not cfg.with_control_host:
        return

    # --- the control host -------------------------------------------------------------------------------------
    host_account = bucket_account("control", "cloudmodal control host")
    address = gcp.compute.Address(
        f"{n}-control", name=f"{n}-control", region=region, labels=labels, opts=opts
    )
    user_data = pulumi.Output.all(bucket.name, address.address).apply(
        lambda a: control_host_user_data(cfg, bucket_url=f"gs://{a[0]}", address=a[1], env={})
    )
    metadata: dict[str, pulumi.Input[str]] = {"user-data": user_data, "block-project-ssh-keys": "true"}
    if cfg.ssh_public_key:
        metadata["ssh-keys"] = f"ubuntu:{cfg.ssh_public_key.strip()}"
    gcp.compute.Instance(
        f"{n}-control",
        name=f"{n}-control",
        zone=f"{region}-a",
        machine_type=CONTROL_HOST_TYPE,
        boot_disk=gcp.compute.InstanceBootDiskArgs(
            initialize_params=gcp.compute.InstanceBootDiskInitializeParamsArgs(
                image=CONTROL_HOST_IMAGE, size=30, type="pd-balanced", labels=labels
            )
        ),
        network_interfaces=[
            gcp.compute.InstanceNetworkInterfaceArgs(
                subnetwork=subnet.id,
                access_configs=[gcp.compute.InstanceNetworkInterfaceAccessConfigArgs(nat_ip=address.address)],
            )
        ],
        service_account=gcp.compute.InstanceServiceAccountArgs(
            email=host_account.email, scopes=["cloud-platform"]
        ),
        shielded_instance_config=gcp.compute.InstanceShieldedInstanceConfigArgs(
            enable_secure_boot=True, enable_vtpm=True, enable_integrity_monitoring=True
        ),
        metadata=metadata,
        tags=[control_tag],
        labels=labels,
        opts=opts,
    )
    export_control_host(cfg, address.address)
