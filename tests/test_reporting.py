"""Provenance: what a result came from, including the machine its timings ran on."""

import torch

from iam.reporting import provenance


def test_provenance_names_the_cpu_its_vector_path_and_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = provenance(["bench"])
    finally:
        torch.set_num_threads(threads)
    assert made["argv"] == "iam bench" and made["threads"] == 1
    assert made["cpu"] and made["cpu_isa"] in {"amx", "avx512_bf16", "AVX512", "AVX2", "DEFAULT", "NO AVX"}
    flags = open("/proc/cpuinfo").read()
    assert (made["cpu_isa"] == "amx") == ("amx_bf16" in flags)
