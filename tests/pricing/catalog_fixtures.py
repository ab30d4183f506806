"""Small SkyPilot-v8-shaped catalogs for the pricing tests, and where the real shared snapshot lives."""

from __future__ import annotations

from pathlib import Path

AWS_HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone,Arch"
GCP_HEADER = "InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,SpotPrice"
AZURE_HEADER = (
    "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,Generation"
)
LAMBDA_HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Price,Region,GpuInfo,SpotPrice"
RUNPOD_HEADER = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,Region,SpotPrice,Price,AvailabilityZone,GpuInfo"


def aws_info(name: str, count: int, mib: int) -> str:
    return (
        f"\"{{'Gpus': [{{'Name': '{name}', 'Manufacturer': 'NVIDIA', 'Count': {count}, "
        f"'MemoryInfo': {{'SizeInMiB': {mib}}}}}], 'TotalGpuMemoryInMiB': {mib * count}}}\""
    )


def gcp_info(mib: int) -> str:
    return f"\"{{'Gpus': [{{'MemoryInfo': {{'SizeInMiB': {mib}}}}}]}}\""


TINY: dict[str, list[str]] = {
    "aws/vms.csv": [
        AWS_HEADER,
        f"p5.48xlarge,H100,8.0,192.0,2048.0,{aws_info('H100', 8, 81920)},55.04,12.5,us-east-1,use1-az1,x86_64",
        f"p5.48xlarge,H100,8.0,192.0,2048.0,{aws_info('H100', 8, 81920)},55.04,,us-east-1,use1-az2,x86_64",
        f"p4d.24xlarge,A100,8.0,96.0,1152.0,{aws_info('A100', 8, 40960)},21.96,8.1,us-east-1,use1-az1,x86_64",
        f"p4de.24xlarge,A100,8.0,96.0,1152.0,{aws_info('A100', 8, 81920)},27.45,9.3,us-east-1,use1-az1,x86_64",
        f"g5.xlarge,A10G,1.0,4.0,16.0,{aws_info('A10G', 1, 22888)},1.006,0.35,us-west-2,usw2-az1,x86_64",
        # spot-only (AWS p5e has no on-demand price)
        f"p5e.48xlarge,H200,8.0,192.0,2048.0,{aws_info('H200', 8, 144384)},,19.4,us-east-1,use1-az1,x86_64",
        # neither price: skipped
        f"p5e.48xlarge,H200,8.0,192.0,2048.0,{aws_info('H200', 8, 144384)},,,us-east-1,use1-az2,x86_64",
        # partial GPU: skipped
        f"g6f.large,L4,0.125,2.0,8.0,{aws_info('L4', 0, 2861)},0.2,0.08,us-east-1,use1-az1,x86_64",
    ],
    "gcp/vms.csv": [
        GCP_HEADER,
        # host VMs in us-central1-a
        "n1-standard-1,1.0,3.75,,,,us-central1,us-central1-a,0.0475,0.01",
        "n1-highmem-4,4.0,26.0,,,,us-central1,us-central1-a,0.2366,0.05",
        "n1-highmem-8,8.0,52.0,,,,us-central1,us-central1-a,0.4732,0.1",
        "n1-standard-64,64.0,240.0,,,,us-central1,us-central1-a,3.04,0.64",
        "n1-highmem-96,96.0,624.0,,,,us-central1,us-central1-a,5.68,1.2",
        "a2-highgpu-1g,12.0,85.0,,,,us-central1,us-central1-a,0.94803,0.41783",
        "a3-highgpu-8g,208.0,1872.0,,,,us-central1,us-central1-a,11.0,2.6",
        "a4-highgpu-8g,224.0,3968.0,,,,us-central1,us-central1-a,0.0,0.0",
        # GPU rows
        f",,,T4,1,{gcp_info(16384)},us-central1,us-central1-a,0.35,0.14",
        f",,,T4,4,{gcp_info(16384)},us-central1,us-central1-a,1.4,0.56",
        f",,,A100,1,{gcp_info(40960)},us-central1,us-central1-a,2.72536,1.38602",
        f",,,H100,8,{gcp_info(81920)},us-central1,us-central1-a,33.6,24.35",
        f",,,B200,8,{gcp_info(184320)},us-central1,us-central1-a,90.216,32.6064",
        # no host VM in this zone: skipped
        f",,,A100,1,{gcp_info(40960)},us-central1,us-central1-b,2.72536,1.38602",
        # a TPU: not a GPU
        ",,,tpu-v4-8,1,,us-central1,us-central1-a,12.88,3.86",
    ],
    "azure/vms.csv": [
        AZURE_HEADER,
        "Standard_NC24ads_A100_v4,A100-80GB,1,24.0,220,A100-80GB,3.673,0.7346,eastus,V2",
        "Standard_ND96isr_H100_v5,H100,8,96.0,1900,H100,98.32,98.32,eastus,V2",
        "Standard_D2s_v3,,,2.0,8,,0.096,0.0192,eastus,V1",
    ],
    "lambda/vms.csv": [
        LAMBDA_HEADER,
        f"gpu_8x_h100_sxm5,H100,8.0,208.0,1800.0,23.92,us-east-1,{aws_info('H100', 8, 81920)},",
        f"gpu_1x_a10,A10,1.0,30.0,200.0,0.75,us-east-1,{aws_info('A10', 1, 24576)},",
        "cpu_4x_generalx,,,4.0,16.0,0.2,us-east-1,,",
    ],
    "runpod/vms.csv": [
        RUNPOD_HEADER,
        "8x_H100-SXM_SECURE,H100-SXM,8.0,128.0,1000.0,US,,21.52,US-TX-3,"
        "\"{'Gpus': [{'Name': 'H100 SXM', 'Manufacturer': 'Nvidia', 'Count': 8.0, 'MemoryInfo': {'SizeInMiB': 80}}], "
        "'TotalGpuMemoryInMiB': 80}\"",
    ],
}


def write_catalog(root: Path, files: dict[str, list[str]] | None = None) -> Path:
    """Write ``files`` ({relative path: lines}) under ``root`` and return ``root``."""
    for rel, lines in (TINY if files is None else files).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def find_shared_pricing() -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    for cand in (repo.parent / "shared" / "pricing",):
        if (cand / "catalogs" / "v8").is_dir() and (cand / "gpu_offers.csv").is_file():
            return cand
    return None
