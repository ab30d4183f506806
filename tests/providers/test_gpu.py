"""GPU inventory: parsers on recorded nvidia-smi output, the fake-GPU switch, CUDA_VISIBLE_DEVICES, fallbacks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cloudmodal.exception import InvalidError
from cloudmodal.providers import gpu as gpu_mod
from cloudmodal.providers.gpu import (
    GpuDevice,
    canonical_device_name,
    detect_gpus,
    filter_visible,
    parse_fake_gpus,
    parse_nvidia_smi_list,
    parse_nvidia_smi_table,
    parse_query_gpu_csv,
    summarize,
)

H100_UUID = "GPU-21e95231-0c1c-1f33-7abf-e824b7ecf263"
H100 = GpuDevice(0, "H100", "NVIDIA H100 80GB HBM3", H100_UUID, 81559)

# Inline copies of ../shared/fixtures/gpu/ (recorded on an H100 host), so these run without ../shared.
QUERY_GPU_CSV = (
    "index, name, uuid, memory.total [MiB], memory.used [MiB], utilization.gpu [%], driver_version, "
    "pci.bus_id, compute_cap\n"
    "0, NVIDIA H100 80GB HBM3, GPU-21e95231-0c1c-1f33-7abf-e824b7ecf263, 81559 MiB, 0 MiB, 0 %, 580.159.04, "
    "00000000:00:06.0, 9.0\n"
)
NVIDIA_SMI_L = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-21e95231-0c1c-1f33-7abf-e824b7ecf263)\n"
NVIDIA_SMI = """\
Fri Nov 27 03:33:01 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:00:06.0 Off |                    0 |
| N/A   32C    P0            121W /  700W |       0MiB /  81559MiB |      0%      Default |
|                                         |                        |             Disabled |
+-----------------------------------------+------------------------+----------------------+

+-----------------------------------------------------------------------------------------+
| Processes:                                                                              |
|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |
|        ID   ID                                                               Usage      |
|=========================================================================================|
|  No running processes found                                                             |
+-----------------------------------------------------------------------------------------+
"""
# What detect_gpus asks for: --format=csv,noheader,nounits (a made-up 4-GPU host).
QUERY_NOHEADER = """\
0, NVIDIA A100-SXM4-80GB, GPU-aaaa0000-0000-0000-0000-000000000000, 81920
1, NVIDIA A100-SXM4-80GB, GPU-aaaa0000-0000-0000-0000-000000000001, 81920
2, NVIDIA A100-SXM4-40GB, GPU-bbbb0000-0000-0000-0000-000000000002, 40960
3, Tesla T4, GPU-cccc0000-0000-0000-0000-000000000003, 15360
"""


# --- parsers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parser, text, expected",
    [
        (parse_query_gpu_csv, QUERY_GPU_CSV, [H100]),
        (
            parse_nvidia_smi_list,
            NVIDIA_SMI_L,
            [GpuDevice(0, "H100", "NVIDIA H100 80GB HBM3", H100_UUID, None)],
        ),
        (parse_nvidia_smi_table, NVIDIA_SMI, [GpuDevice(0, "H100", "NVIDIA H100 80GB HBM3", None, 81559)]),
        (parse_query_gpu_csv, "", []),
        (parse_nvidia_smi_list, "No devices were found\n", []),
        (
            parse_nvidia_smi_table,
            "NVIDIA-SMI has failed because it couldn't communicate with the driver.\n",
            [],
        ),
    ],
    ids=["query-gpu", "smi-L", "smi-table", "csv-empty", "L-none", "table-no-driver"],
)
def test_parsers_inline(parser, text, expected):
    assert parser(text) == expected


@pytest.mark.parametrize(
    "parser, name, expected",
    [
        (parse_query_gpu_csv, "query-gpu.csv", [H100]),
        (
            parse_nvidia_smi_list,
            "nvidia-smi-L.txt",
            [GpuDevice(0, "H100", "NVIDIA H100 80GB HBM3", H100_UUID)],
        ),
        (
            parse_nvidia_smi_table,
            "nvidia-smi.txt",
            [GpuDevice(0, "H100", "NVIDIA H100 80GB HBM3", None, 81559)],
        ),
    ],
)
def test_parsers_on_recorded_fixtures(gpu_fixture, parser, name, expected):
    assert parser(gpu_fixture(name)) == expected


def test_inline_copies_match_recorded_fixtures(gpu_fixture):
    assert gpu_fixture("query-gpu.csv") == QUERY_GPU_CSV
    assert gpu_fixture("nvidia-smi-L.txt") == NVIDIA_SMI_L
    assert gpu_fixture("nvidia-smi.txt").split("\n", 1)[1] == NVIDIA_SMI.split("\n", 1)[1]


def test_query_without_header_uses_requested_column_order():
    devices = parse_query_gpu_csv(QUERY_NOHEADER)
    assert [(d.index, d.name, d.memory_mib) for d in devices] == [
        (0, "A100-80GB", 81920),
        (1, "A100-80GB", 81920),
        (2, "A100-40GB", 40960),
        (3, "T4", 15360),
    ]
    assert devices[3].uuid == "GPU-cccc0000-0000-0000-0000-000000000003"


def test_query_header_with_reordered_columns():
    text = "name, memory.total [MiB], index\nNVIDIA L4, 23034 MiB, 5\n"
    assert parse_query_gpu_csv(text) == [GpuDevice(5, "L4", "NVIDIA L4", None, 23034)]


def test_smi_list_ignores_mig_lines():
    text = (
        "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-1)\n"
        "  MIG 1g.5gb      Device  0: (UUID: MIG-2)\n"
        "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-3)\n"
    )
    assert [(d.index, d.name, d.uuid) for d in parse_nvidia_smi_list(text)] == [
        (0, "A100-40GB", "GPU-1"),
        (1, "A100-40GB", "GPU-3"),
    ]


@pytest.mark.parametrize(
    "raw, memory_mib, expected",
    [
        ("NVIDIA H100 80GB HBM3", 81559, "H100"),
        ("NVIDIA H100 NVL", 95830, "H100-NVL"),
        ("NVIDIA H200", 143771, "H200"),
        ("NVIDIA A100-SXM4-80GB", 81920, "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", None, "A100-40GB"),
        ("Tesla T4", 15360, "T4"),
        ("NVIDIA A10G", 23028, "A10"),
        ("NVIDIA L4", 23034, "L4"),
        ("NVIDIA L40S", 46068, "L40S"),
        ("Tesla V100-SXM2-32GB", 32768, "V100-32GB"),
        ("NVIDIA GeForce RTX 4090", 24564, "RTX-4090"),
        ("NVIDIA RTX A6000", 49140, "RTX-A6000"),
    ],
)
def test_canonical_device_names(raw, memory_mib, expected):
    assert canonical_device_name(raw, memory_mib) == expected


# --- fake GPUs and CUDA_VISIBLE_DEVICES -----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("H100:2", [(0, "H100"), (1, "H100")]),
        ("h100:2, a10g", [(0, "H100"), (1, "H100"), (2, "A10")]),
        ("A100-80GB", [(0, "A100-80GB")]),
        ("none", []),
        ("0", []),
    ],
)
def test_parse_fake_gpus(spec, expected):
    devices = parse_fake_gpus(spec)
    assert [(d.index, d.name) for d in devices] == expected
    assert all(d.uuid and d.uuid.startswith("GPU-fake-") for d in devices)


def test_fake_gpus_typo_is_loud():
    with pytest.raises(InvalidError, match="Unknown GPU type 'H1000'"):
        parse_fake_gpus("H1000:2")


FOUR = parse_query_gpu_csv(QUERY_NOHEADER)


@pytest.mark.parametrize(
    "cvd, expected",
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("-1", []),
        ("2", [2]),
        ("3,1", [3, 1]),
        ("1,1", [1]),
        ("GPU-bbbb", [2]),  # a unique UUID prefix, as CUDA accepts
        ("GPU-aaaa", []),  # ambiguous prefix: CUDA stops there
        ("0,7,1", [0]),  # parsing stops at the first unknown entry, as CUDA does
        ("MIG-1234", []),
    ],
)
def test_filter_visible(cvd, expected):
    assert [d.index for d in filter_visible(FOUR, cvd)] == expected


def test_detect_gpus_fake_switch_and_parent_cuda_visible_devices():
    assert [d.index for d in detect_gpus({"CLOUDMODAL_FAKE_GPUS": "H100:4"})] == [0, 1, 2, 3]
    env = {"CLOUDMODAL_FAKE_GPUS": "H100:4", "CUDA_VISIBLE_DEVICES": "1,3"}
    assert [(d.index, d.name) for d in detect_gpus(env)] == [(1, "H100"), (3, "H100")]
    assert detect_gpus({"CLOUDMODAL_FAKE_GPUS": "none"}) == []


def test_summarize():
    assert summarize(FOUR) == "2× A100-80GB (GPU 0, 1), 1× A100-40GB (GPU 2), 1× T4 (GPU 3)"
    assert summarize([]) == "no GPUs"


# --- live detection paths, with NVML and nvidia-smi faked ------------------------------------------------


def _fake_nvml(monkeypatch, *, fail_init: bool = False, devices=()):
    mod = types.ModuleType("pynvml")
    calls = {"shutdown": 0}

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def shutdown():
        calls["shutdown"] += 1

    mod.nvmlInit = init
    mod.nvmlShutdown = shutdown
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    mod.nvmlDeviceGetName = lambda h: h[0]
    mod.nvmlDeviceGetUUID = lambda h: h[1]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h[2])
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return calls


def _fake_nvidia_smi(tmp_path: Path, monkeypatch, script: str) -> None:
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.defpath}")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("CLOUDMODAL_FAKE_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_detect_uses_nvml_first(clean_env, monkeypatch, tmp_path):
    calls = _fake_nvml(monkeypatch, devices=[(b"NVIDIA H100 80GB HBM3", b"GPU-x", 85520809984)])
    _fake_nvidia_smi(tmp_path, monkeypatch, "exit 1\n")
    assert detect_gpus() == [GpuDevice(0, "H100", "NVIDIA H100 80GB HBM3", "GPU-x", 81559)]
    assert calls["shutdown"] == 1


def test_detect_falls_back_to_nvidia_smi(clean_env, monkeypatch, tmp_path):
    _fake_nvml(monkeypatch, fail_init=True)
    _fake_nvidia_smi(tmp_path, monkeypatch, f"cat <<'EOF'\n{QUERY_NOHEADER}EOF\n")
    assert [d.name for d in detect_gpus()] == ["A100-80GB", "A100-80GB", "A100-40GB", "T4"]


@pytest.mark.parametrize(
    "script",
    [
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9\n',
        "echo 'garbage,,,'\n",
        "kill -9 $$\n",
    ],
    ids=["no-driver", "garbage", "crash"],
)
def test_detect_never_crashes(clean_env, monkeypatch, tmp_path, script):
    _fake_nvml(monkeypatch, fail_init=True)
    _fake_nvidia_smi(tmp_path, monkeypatch, script)
    assert detect_gpus() == []


def test_detect_without_nvml_or_binary_is_empty(clean_env, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_mod._detect_nvml() is None
    assert detect_gpus() == []


def test_importing_cloudmodal_does_not_import_pynvml():
    code = (
        "import sys, cloudmodal, cloudmodal.providers.local, cloudmodal.server.autoscaler; "
        "assert 'pynvml' not in sys.modules, 'pynvml imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
