"""The standing infrastructure on AWS, as a Pulumi program (``program``).

What it makes, every resource tagged ``cloudmodal-infra`` (the provider's ``default_tags`` too, as a backstop):

- **the bucket** for volumes (``volumes/``) and blobs (``blobs/``): a public access block with all four
  switches on, ``BucketOwnerEnforced`` ownership (no ACLs at all), default encryption (SSE-S3, AES256, with an
  S3 bucket key; a KMS key would add a per-request cost and a key policy to keep in step, for no gain in who
  may read), versioning, a bucket policy refusing every request not over TLS, and lifecycle rules: deleted
  blobs (noncurrent versions under ``blobs/``) gone after ``blob_expiry_days``, overwritten or deleted volume
  files after ``NONCURRENT_EXPIRY_DAYS``, database backups after ``BACKUP_EXPIRY_DAYS``, incomplete uploads
  after a day. Current blobs are never expired by age: the control plane's retention knows which are still
  referenced (see ``infra/common.py``);
- **the workers' identity**: an IAM role only EC2 may assume, with one inline policy allowing S3 actions on this
  bucket and its objects and nothing else, and its instance profile (its name is the output
  ``worker_identity``: the AWS provider's ``instance_profile``);
- **the network**: a VPC (named, so the provider's ``vpc_name`` finds it) with a public subnet per zone (up to
  three), and the workers' security group (its name is ``network``: the provider's ``security_group``): SSH
  only from ``control_plane_cidrs`` (and from the control host's group), all traffic between the group's own
  members (a cluster's nodes), nothing else in; everything out;
- **with ``with_control_host``**: a t3.small Ubuntu host with an Elastic IP, its own security group (the
  control plane's port open to the world, TLS; SSH only from ``admin_cidrs``), IMDSv2 only, an encrypted disk,
  its own role scoped to the same bucket, and **PostgreSQL on the host**. On the host rather than RDS: a team's
  control plane keeps small, hot state, and one host keeps it cheap (RDS's smallest instance costs as much
  again as the host) and in one place, reached over a Unix socket with peer authentication (no password to
  keep); the backups RDS would give are a nightly ``pg_dump`` to ``backups/`` in the versioned bucket. A team
  that outgrows that points ``CLOUDMODAL_DATABASE_URL`` at RDS by hand.
"""

from __future__ import annotations

import functools
import json

import pulumi
import pulumi_aws as aws

from .common import (
    ABORT_MULTIPART_DAYS,
    SSH_PORT,
    InfraConfig,
    control_host_user_data,
    export_control_host,
    export_outputs,
    lifecycle_rules,
    resource_tags,
)

VPC_CIDR = "10.73.0.0/16"
MAX_ZONES = 3
CONTROL_HOST_TYPE = "t3.small"
UBUNTU_OWNER = "099720109477"  # Canonical
UBUNTU_IMAGE = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
# What a worker (and the control plane) does with the bucket: read, write, list and delete objects. No
# bucket configuration, no ACLs, no policy changes.
BUCKET_ACTIONS = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
OBJECT_ACTIONS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]


def bucket_policy_document(bucket_arn: str) -> str:
    """The identity policy of workers and the control host: this bucket and its objects, nothing else."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "Bucket", "Effect": "Allow", "Action": BUCKET_ACTIONS, "Resource": [bucket_arn]},
                {
                    "Sid": "Objects",
                    "Effect": "Allow",
                    "Action": OBJECT_ACTIONS,
                    "Resource": [f"{bucket_arn}/*"],
                },
            ],
        }
    )


def _tls_only_policy(bucket_arn: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "DenyWithoutTLS",
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": "s3:*",
                    "Resource": [bucket_arn, f"{bucket_arn}/*"],
                    "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                }
            ],
        }
    )


EC2_TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
)


def _zone(i: int, names: list[str]) -> str:
    return names[i % len(names)]  # fewer zones than MAX_ZONES: subnets share them


def _split(cidrs: list[str]) -> tuple[list[str], list[str]]:
    return [c for c in cidrs if ":" not in c], [c for c in cidrs if ":" in c]


def _ssh_from(description: str, cidrs: list[str]) -> list[aws.ec2.SecurityGroupIngressArgs]:
    """A rule letting ``cidrs`` (IPv4 and IPv6) SSH in; none when there are none."""
    v4, v6 = _split(cidrs)
    if not (v4 or v6):
        return []
    return [
        aws.ec2.SecurityGroupIngressArgs(
            description=description,
            protocol="tcp",
            from_port=SSH_PORT,
            to_port=SSH_PORT,
            cidr_blocks=v4,
            ipv6_cidr_blocks=v6,
        )
    ]


def program(cfg: InfraConfig) -> None:
    cfg.validate()
    n = cfg.name
    region = cfg.resolved_region
    tags = resource_tags()
    provider = aws.Provider(f"{n}-aws", region=region, default_tags=aws.ProviderDefaultTagsArgs(tags=tags))
    opts = pulumi.ResourceOptions(provider=provider)

    def named(kind: str) -> dict[str, str]:
        return {**tags, "Name": f"{n}-{kind}"}

    def ec2_identity(kind: str, description: str) -> tuple[aws.iam.Role, aws.iam.InstanceProfile]:
        """A role only EC2 may assume, allowed this bucket only, and its instance profile ``<name>-<kind>``."""
        role = aws.iam.Role(
            f"{n}-{kind}", assume_role_policy=EC2_TRUST, description=description, tags=tags, opts=opts
        )
        aws.iam.RolePolicy(
            f"{n}-{kind}-bucket",
            role=role.id,
            policy=bucket.arn.apply(bucket_policy_document),
            opts=pulumi.ResourceOptions(provider=provider, parent=role),
        )
        profile = aws.iam.InstanceProfile(
            f"{n}-{kind}", name=f"{n}-{kind}", role=role.name, tags=tags, opts=opts
        )
        return role, profile

    def security_group(
        kind: str, description: str, ingress: list[aws.ec2.SecurityGroupIngressArgs]
    ) -> aws.ec2.SecurityGroup:
        return aws.ec2.SecurityGroup(
            f"{n}-{kind}",
            name=f"{n}-{kind}",
            description=description,
            vpc_id=vpc.id,
            ingress=ingress,
            egress=everything_out,
            tags=named(kind),
            opts=net,
        )

    # --- the bucket ---------------------------------------------------------------------------------------
    bucket = aws.s3.Bucket(f"{n}-store", bucket_prefix=f"{n}-store-", tags=tags, opts=opts)
    child = pulumi.ResourceOptions(provider=provider, parent=bucket)
    public_block = aws.s3.BucketPublicAccessBlock(
        f"{n}-store-public-access",
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
        opts=child,
    )
    aws.s3.BucketOwnershipControls(
        f"{n}-store-ownership",
        bucket=bucket.id,
        rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
        opts=child,
    )
    aws.s3.BucketServerSideEncryptionConfiguration(
        f"{n}-store-encryption",
        bucket=bucket.id,
        rules=[
            aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                    sse_algorithm="AES256"
                ),
                bucket_key_enabled=True,
            )
        ],
        opts=child,
    )
    versioning = aws.s3.BucketVersioning(
        f"{n}-store-versioning",
        bucket=bucket.id,
        versioning_configuration=aws.s3.BucketVersioningVersioningConfigurationArgs(status="Enabled"),
        opts=child,
    )
    expiry = aws.s3.BucketLifecycleConfigurationRuleNoncurrentVersionExpirationArgs
    aws.s3.BucketLifecycleConfiguration(
        f"{n}-store-lifecycle",
        bucket=bucket.id,
        rules=[
            *(
                aws.s3.BucketLifecycleConfigurationRuleArgs(
                    id=rule.id,
                    status="Enabled",
                    filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=f"{rule.prefix}/"),
                    expiration=None
                    if rule.current_days is None
                    else aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(days=rule.current_days),
                    noncurrent_version_expiration=expiry(noncurrent_days=rule.noncurrent_days),
                )
                for rule in lifecycle_rules(cfg)
            ),
            aws.s3.BucketLifecycleConfigurationRuleArgs(
                id="incomplete-uploads",
                status="Enabled",
                filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
                abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                    days_after_initiation=ABORT_MULTIPART_DAYS
                ),
            ),
        ],
        opts=pulumi.ResourceOptions(provider=provider, parent=bucket, depends_on=[versioning]),
    )
    aws.s3.BucketPolicy(
        f"{n}-store-tls-only",
        bucket=bucket.id,
        policy=bucket.arn.apply(_tls_only_policy),
        # the public access block first: a policy put before it would be judged without it
        opts=pulumi.ResourceOptions(provider=provider, parent=bucket, depends_on=[public_block]),
    )

    # --- the workers' identity ------------------------------------------------------------------------------
    _, worker_profile = ec2_identity("worker", "cloudmodal workers")

    # --- the network ------------------------------------------------------------------------------------------
    vpc = aws.ec2.Vpc(
        f"{n}-vpc",
        cidr_block=VPC_CIDR,
        enable_dns_hostnames=True,
        enable_dns_support=True,
        tags=named("vpc"),
        opts=opts,
    )
    net = pulumi.ResourceOptions(provider=provider, parent=vpc)
    gateway = aws.ec2.InternetGateway(f"{n}-igw", vpc_id=vpc.id, tags=named("igw"), opts=net)
    routes = aws.ec2.RouteTable(
        f"{n}-public",
        vpc_id=vpc.id,
        routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=gateway.id)],
        tags=named("public"),
        opts=net,
    )
    zones = aws.get_availability_zones_output(
        state="available", opts=pulumi.InvokeOutputOptions(provider=provider)
    ).names
    subnets: list[aws.ec2.Subnet] = []
    for i in range(MAX_ZONES):
        zone = zones.apply(functools.partial(_zone, i))
        subnet = aws.ec2.Subnet(
            f"{n}-public-{i}",
            vpc_id=vpc.id,
            cidr_block=f"10.73.{i * 16}.0/20",
            availability_zone=zone,
            map_public_ip_on_launch=True,
            tags=named(f"public-{i}"),
            opts=net,
        )
        aws.ec2.RouteTableAssociation(
            f"{n}-public-{i}", subnet_id=subnet.id, route_table_id=routes.id, opts=net
        )
        subnets.append(subnet)

    everything_out = [
        aws.ec2.SecurityGroupEgressArgs(
            protocol="-1", from_port=0, to_port=0, cidr_blocks=["0.0.0.0/0"], ipv6_cidr_blocks=["::/0"]
        )
    ]
    control_group: aws.ec2.SecurityGroup | None = None
    if cfg.with_control_host:
        control_in = [
            aws.ec2.SecurityGroupIngressArgs(
                description="the control plane (TLS)",
                protocol="tcp",
                from_port=cfg.control_plane_port,
                to_port=cfg.control_plane_port,
                cidr_blocks=["0.0.0.0/0"],
                ipv6_cidr_blocks=["::/0"],
            )
        ]
        control_in += _ssh_from("SSH from administrators", cfg.admin_ssh_cidrs())
        control_group = security_group("control", "cloudmodal control host", control_in)

    worker_in = [
        aws.ec2.SecurityGroupIngressArgs(
            description="a cluster's nodes among themselves", protocol="-1", from_port=0, to_port=0, self=True
        )
    ]
    worker_in += _ssh_from("SSH from the control plane", cfg.ssh_cidrs())
    if control_group is not None:
        worker_in.append(
            aws.ec2.SecurityGroupIngressArgs(
                description="SSH from the control host",
                protocol="tcp",
                from_port=SSH_PORT,
                to_port=SSH_PORT,
                security_groups=[control_group.id],
            )
        )
    worker_group = security_group("nodes", "cloudmodal workers", worker_in)

    export_outputs(
        cfg,
        bucket_url=bucket.bucket.apply(lambda b: f"s3://{b}"),
        worker_identity=worker_profile.name,
        network=worker_group.name,
    )
    pulumi.export("vpc_name", f"{n}-vpc")

    if control_group is None:
        return

    # --- the control host -------------------------------------------------------------------------------------
    _, host_profile = ec2_identity("control", "cloudmodal control host")
    address = aws.ec2.Eip(f"{n}-control", domain="vpc", tags=named("control"), opts=opts)
    image = aws.ec2.get_ami_output(
        most_recent=True,
        owners=[UBUNTU_OWNER],
        filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[UBUNTU_IMAGE])],
        opts=pulumi.InvokeOutputOptions(provider=provider),
    )
    key_name: pulumi.Input[str] | None = None
    if cfg.ssh_public_key:
        key_name = aws.ec2.KeyPair(
            f"{n}-control", public_key=cfg.ssh_public_key.strip(), tags=tags, opts=opts
        ).key_name
    user_data = pulumi.Output.all(bucket.bucket, address.public_ip).apply(
        lambda a: control_host_user_data(
            cfg, bucket_url=f"s3://{a[0]}", address=a[1], env={"AWS_REGION": region}
        )
    )
    host = aws.ec2.Instance(
        f"{n}-control",
        ami=image.id,
        instance_type=CONTROL_HOST_TYPE,
        subnet_id=subnets[0].id,
        vpc_security_group_ids=[control_group.id],
        iam_instance_profile=host_profile.name,
        key_name=key_name,
        user_data=user_data,
        metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required", http_endpoint="enabled"),
        root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
            volume_size=30, volume_type="gp3", encrypted=True, tags=tags
        ),
        tags=named("control"),
        opts=opts,
    )
    aws.ec2.EipAssociation(
        f"{n}-control", allocation_id=address.allocation_id, instance_id=host.id, opts=opts
    )
    export_control_host(cfg, address.public_ip)
