"""The standing infrastructure on Azure, as a Pulumi program (``program``), with the native provider
(``pulumi-azure-native``: it follows Azure's own API versions, and imports its modules lazily, so a program
using five of them costs no more to load than the classic provider).

What it makes, in one resource group ``<name>-rg``, every resource that takes tags tagged ``cloudmodal-infra``
(containers, blob service settings, lifecycle policies and role assignments take none):

- **the storage account** (an auto-suffixed name, output ``storage_account``: ``AZURE_STORAGE_ACCOUNT_NAME``) and
  its container ``cloudmodal`` (output ``bucket_url``: ``az://cloudmodal``) for volumes and blobs: no public blob
  access, no shared-key access (only Entra ID identities: no account key exists to leak), HTTPS only, TLS 1.2 at
  least, encryption at rest with Microsoft-managed keys (always on in Azure; set here explicitly for blobs, with
  infrastructure encryption as a second layer), the container's public access ``None``; blob versioning, soft
  delete of blobs and containers, and a lifecycle policy: deleted blobs (versions under ``blobs/``) gone after
  ``blob_expiry_days``, old volume file versions after ``NONCURRENT_EXPIRY_DAYS``, backups after
  ``BACKUP_EXPIRY_DAYS``;
- **the workers' identity**: a user-assigned managed identity (its resource id is ``worker_identity``) with one
  role assignment, Storage Blob Data Contributor, scoped to the container — nothing at the account, resource
  group or subscription;
- **the network**: a VNet with a subnet for workers, whose NSG (its id is ``network``) allows SSH only from
  ``control_plane_cidrs``; Azure's default rules add traffic within the VNet (so the control host, in the
  VNet's other subnet, reaches workers) and deny everything else in; everything out;
- **with ``with_control_host``** (it needs ``ssh_public_key``: Azure's Linux VMs take a key or a password, and a
  password is not offered): a Standard_B2s Ubuntu VM with a static public IP, password login off, its own
  identity with the same single role assignment, its own NSG on its NIC opening the control plane's port to the
  world and SSH only to ``admin_cidrs``, and **PostgreSQL on the host** (why there rather than Azure Database
  for PostgreSQL: as on AWS — see ``infra/aws.py``).
"""

from __future__ import annotations

import base64

import pulumi
import pulumi_azure_native as az

from .common import (
    OUT_STORAGE_ACCOUNT,
    SSH_PORT,
    InfraConfig,
    LifecycleRule,
    control_host_user_data,
    export_control_host,
    export_outputs,
    lifecycle_rules,
    resource_tags,
)

CONTAINER = "cloudmodal"
VNET_CIDR = "10.75.0.0/16"
SUBNET_CIDR = "10.75.0.0/20"
CONTROL_SUBNET_CIDR = "10.75.16.0/24"
# Storage Blob Data Contributor: read, write, delete blobs and list containers' blobs; no account settings
BLOB_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
SOFT_DELETE_DAYS = 7
CONTROL_HOST_SIZE = "Standard_B2s"


def _role_assignment(
    name: str,
    principal_id: pulumi.Input[str],
    scope: pulumi.Input[str],
    subscription: pulumi.Input[str],
    opts: pulumi.ResourceOptions,
) -> az.authorization.RoleAssignment:
    return az.authorization.RoleAssignment(
        name,
        principal_id=principal_id,
        principal_type="ServicePrincipal",
        role_definition_id=pulumi.Output.from_input(subscription).apply(
            lambda s: (
                f"/subscriptions/{s}/providers/Microsoft.Authorization/roleDefinitions/{BLOB_CONTRIBUTOR}"
            )
        ),
        scope=scope,
        opts=opts,
    )


def _allow_in(name: str, priority: int, port: int, sources: str | list[str]) -> az.network.SecurityRuleArgs:
    """An inbound TCP allow rule to ``port`` from ``sources``: one prefix (``"*"``) or a list of CIDRs."""
    return az.network.SecurityRuleArgs(
        name=name,
        priority=priority,
        direction="Inbound",
        access="Allow",
        protocol="Tcp",
        source_address_prefix=sources if isinstance(sources, str) else None,
        source_address_prefixes=None if isinstance(sources, str) else sources,
        source_port_range="*",
        destination_address_prefix="*",
        destination_port_range=str(port),
    )


def program(cfg: InfraConfig) -> None:
    cfg.validate()
    n = cfg.name
    region = cfg.resolved_region
    tags = resource_tags()
    provider = az.Provider(f"{n}-azure", location=region)
    opts = pulumi.ResourceOptions(provider=provider)
    client = az.authorization.get_client_config_output(opts=pulumi.InvokeOutputOptions(provider=provider))
    group = az.resources.ResourceGroup(
        f"{n}-rg", resource_group_name=f"{n}-rg", location=region, tags=tags, opts=opts
    )
    rg = group.name
    child = pulumi.ResourceOptions(provider=provider, parent=group)

    # --- the storage account and its container ----------------------------------------------------------------
    enabled = az.storage.EncryptionServiceArgs(enabled=True, key_type="Account")
    account = az.storage.StorageAccount(
        f"{n.replace('-', '')[:11]}store",  # auto-named with a suffix: 3-24 lowercase letters and digits
        resource_group_name=rg,
        location=region,
        kind="StorageV2",
        sku=az.storage.SkuArgs(name="Standard_LRS"),
        access_tier=az.storage.AccessTier.HOT,
        allow_blob_public_access=False,
        allow_shared_key_access=False,
        default_to_o_auth_authentication=True,
        enable_https_traffic_only=True,
        minimum_tls_version="TLS1_2",
        allow_cross_tenant_replication=False,
        encryption=az.storage.EncryptionArgs(
            key_source="Microsoft.Storage",
            require_infrastructure_encryption=True,
            services=az.storage.EncryptionServicesArgs(blob=enabled, file=enabled),
        ),
        tags=tags,
        opts=child,
    )
    store = pulumi.ResourceOptions(provider=provider, parent=account)
    az.storage.BlobServiceProperties(
        f"{n}-blob-service",
        account_name=account.name,
        resource_group_name=rg,
        blob_services_name="default",
        is_versioning_enabled=True,
        delete_retention_policy=az.storage.DeleteRetentionPolicyArgs(enabled=True, days=SOFT_DELETE_DAYS),
        container_delete_retention_policy=az.storage.DeleteRetentionPolicyArgs(
            enabled=True, days=SOFT_DELETE_DAYS
        ),
        opts=store,
    )
    container = az.storage.BlobContainer(
        f"{n}-container",
        account_name=account.name,
        resource_group_name=rg,
        container_name=CONTAINER,
        public_access=az.storage.PublicAccess.NONE,
        opts=store,
    )

    def rule(r: LifecycleRule) -> az.storage.ManagementPolicyRuleArgs:
        base_blob = (
            None
            if r.current_days is None
            else az.storage.ManagementPolicyBaseBlobArgs(
                delete=az.storage.DateAfterModificationArgs(
                    days_after_modification_greater_than=r.current_days
                )
            )
        )
        versions = az.storage.ManagementPolicyVersionArgs(
            delete=az.storage.DateAfterCreationArgs(days_after_creation_greater_than=r.noncurrent_days)
        )
        return az.storage.ManagementPolicyRuleArgs(
            name=r.id,
            type="Lifecycle",
            enabled=True,
            definition=az.storage.ManagementPolicyDefinitionArgs(
                actions=az.storage.ManagementPolicyActionArgs(base_blob=base_blob, version=versions),
                filters=az.storage.ManagementPolicyFilterArgs(
                    blob_types=["blockBlob"], prefix_match=[f"{CONTAINER}/{r.prefix}/"]
                ),
            ),
        )

    az.storage.ManagementPolicy(
        f"{n}-lifecycle",
        account_name=account.name,
        resource_group_name=rg,
        management_policy_name="default",
        policy=az.storage.ManagementPolicySchemaArgs(rules=[rule(r) for r in lifecycle_rules(cfg)]),
        opts=store,
    )

    # --- the workers' identity ------------------------------------------------------------------------------
    def identity(kind: str) -> az.managedidentity.UserAssignedIdentity:
        """A managed identity ``<name>-<kind>`` with one role assignment, scoped to the container."""
        made = az.managedidentity.UserAssignedIdentity(
            f"{n}-{kind}",
            resource_name_=f"{n}-{kind}",
            resource_group_name=rg,
            location=region,
            tags=tags,
            opts=child,
        )
        _role_assignment(f"{n}-{kind}-blob", made.principal_id, container.id, client.subscription_id, store)
        return made

    def security_group(
        kind: str, rules: list[az.network.SecurityRuleArgs]
    ) -> az.network.NetworkSecurityGroup:
        return az.network.NetworkSecurityGroup(
            f"{n}-{kind}",
            network_security_group_name=f"{n}-{kind}",
            resource_group_name=rg,
            location=region,
            security_rules=rules,
            tags=tags,
            opts=child,
        )

    worker = identity("worker")

    # --- the network ------------------------------------------------------------------------------------------
    ssh_rules = []
    if cfg.control_plane_cidrs:
        ssh_rules.append(_allow_in("ssh-from-control-plane", 100, SSH_PORT, cfg.ssh_cidrs()))
    worker_nsg = security_group("nodes", ssh_rules)
    vnet = az.network.VirtualNetwork(
        f"{n}-vnet",
        virtual_network_name=f"{n}-vnet",
        resource_group_name=rg,
        location=region,
        address_space=az.network.AddressSpaceArgs(address_prefixes=[VNET_CIDR]),
        tags=tags,
        opts=child,
    )
    in_vnet = pulumi.ResourceOptions(provider=provider, parent=vnet)
    az.network.Subnet(
        f"{n}-workers",
        subnet_name="workers",
        virtual_network_name=vnet.name,
        resource_group_name=rg,
        address_prefix=SUBNET_CIDR,
        network_security_group=az.network.NetworkSecurityGroupArgs(id=worker_nsg.id),
        opts=in_vnet,
    )

    export_outputs(cfg, bucket_url=f"az://{CONTAINER}", worker_identity=worker.id, network=worker_nsg.id)
    pulumi.export(OUT_STORAGE_ACCOUNT, account.name)
    pulumi.export("worker_client_id", worker.client_id)
    pulumi.export("resource_group", rg)
    pulumi.export("vnet", vnet.name)

    if not cfg.with_control_host:
        return

    # --- the control host -------------------------------------------------------------------------------------
    assert cfg.ssh_public_key is not None  # validate() asks for one
    host_identity = identity("control")
    control_rules = [_allow_in("control-plane", 100, cfg.control_plane_port, "*")]
    if cfg.admin_cidrs:
        control_rules.append(_allow_in("ssh-admin", 110, SSH_PORT, cfg.admin_ssh_cidrs()))
    control_nsg = security_group("control", control_rules)
    address = az.network.PublicIPAddress(
        f"{n}-control",
        public_ip_address_name=f"{n}-control",
        resource_group_name=rg,
        location=region,
        public_ip_allocation_method="Static",
        sku=az.network.PublicIPAddressSkuArgs(name="Standard"),
        tags=tags,
        opts=child,
    )
    # its own subnet, whose NIC carries its NSG: a subnet's NSG and a NIC's NSG must both allow a port
    control_subnet = az.network.Subnet(
        f"{n}-control-subnet",
        subnet_name="control",
        virtual_network_name=vnet.name,
        resource_group_name=rg,
        address_prefix=CONTROL_SUBNET_CIDR,
        opts=in_vnet,
    )
    nic = az.network.NetworkInterface(
        f"{n}-control",
        network_interface_name=f"{n}-control",
        resource_group_name=rg,
        location=region,
        network_security_group=az.network.NetworkSecurityGroupArgs(id=control_nsg.id),
        ip_configurations=[
            az.network.NetworkInterfaceIPConfigurationArgs(
                name="primary",
                subnet=az.network.SubnetArgs(id=control_subnet.id),
                public_ip_address=az.network.PublicIPAddressArgs(id=address.id),
            )
        ],
        tags=tags,
        opts=child,
    )
    env = pulumi.Output.all(account.name, host_identity.client_id).apply(
        lambda a: {"AZURE_STORAGE_ACCOUNT_NAME": a[0], "AZURE_CLIENT_ID": a[1]}
    )
    custom_data = pulumi.Output.all(address.ip_address, env).apply(
        lambda a: base64.b64encode(
            control_host_user_data(cfg, bucket_url=f"az://{CONTAINER}", address=a[0], env=a[1]).encode()
        ).decode()
    )
    az.compute.VirtualMachine(
        f"{n}-control",
        vm_name=f"{n}-control",
        resource_group_name=rg,
        location=region,
        hardware_profile=az.compute.HardwareProfileArgs(vm_size=CONTROL_HOST_SIZE),
        identity=az.compute.VirtualMachineIdentityArgs(
            type=az.compute.ResourceIdentityType.USER_ASSIGNED,
            user_assigned_identities=[host_identity.id],
        ),
        network_profile=az.compute.NetworkProfileArgs(
            network_interfaces=[az.compute.NetworkInterfaceReferenceArgs(id=nic.id, primary=True)]
        ),
        os_profile=az.compute.OSProfileArgs(
            computer_name=f"{n}-control",
            admin_username="ubuntu",
            custom_data=custom_data,
            linux_configuration=az.compute.LinuxConfigurationArgs(
                disable_password_authentication=True,
                ssh=az.compute.SshConfigurationArgs(
                    public_keys=[
                        az.compute.SshPublicKeyArgs(
                            key_data=cfg.ssh_public_key.strip(), path="/home/ubuntu/.ssh/authorized_keys"
                        )
                    ]
                ),
            ),
        ),
        storage_profile=az.compute.StorageProfileArgs(
            image_reference=az.compute.ImageReferenceArgs(
                publisher="Canonical", offer="ubuntu-24_04-lts", sku="server", version="latest"
            ),
            os_disk=az.compute.OSDiskArgs(
                create_option="FromImage",
                disk_size_gb=30,
                managed_disk=az.compute.ManagedDiskParametersArgs(storage_account_type="StandardSSD_LRS"),
            ),
        ),
        tags=tags,
        opts=child,
    )
    export_control_host(cfg, address.ip_address)
