"""Which device a lookup table was measured on: the fingerprint and DeviceInfo, read from the
texts of real devices (tests/data/devices: phones, a Raspberry Pi 5, Jetsons; see its README).

The probe runs on a copy of each device's /proc and /sys files and a stand-in `getprop` that
prints the device's recorded properties. Two different devices never share a fingerprint; the
same device after a reboot (new clocks, BogoMIPS, boot id, uptime) keeps it; another unit of the
same model with the same OS build shares it, so a table built on one phone holds for its twin.
The daemon's pinning (`serve --cpus`) is checked on a real daemon.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import pytest

from device_server import wire
from device_server.android_props import parse_getprop, read_props
from device_server.cpu_parts import core_name
from device_server.cpu_topology import format_cpu_list, parse_cpu_list, parse_cpuinfo
from device_server.device_info import DeviceIdentity, probe_identity
from host.cli import netadapt_bench as bench_cli
from host.device.local_daemon import start_local_daemon

DEVICES = Path(__file__).parent / "data" / "devices"
NAMES = sorted(p.name for p in DEVICES.iterdir() if p.is_dir())
PROVIDERS = ("CPUExecutionProvider",)


def stand_in_getprop(tmp: Path, listing: Path | None) -> str:
    """A `getprop` that prints the device's recorded listing (or nothing, off Android)."""
    program = tmp / "getprop"
    program.write_text(f"#!/bin/sh\ncat '{listing}'\n" if listing else "#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return str(program)


def probe(tree: Path, tmp: Path, providers: tuple[str, ...] = PROVIDERS,
          with_getprop: bool = True) -> DeviceIdentity:
    listing = tree / "getprop.txt"
    getprop = stand_in_getprop(tmp, listing if listing.exists() else None)
    return probe_identity(root=tree, getprop=getprop if with_getprop else None,
                          providers=providers, affinity=())


def copy_of(name: str, tmp: Path) -> Path:
    tree = tmp / f"{name}-{secrets.token_hex(3)}"
    shutil.copytree(DEVICES / name, tree)
    return tree


def reboot(tree: Path) -> None:
    """What a reboot changes and the identity must not read: BogoMIPS and `cpu MHz` (x86
    recomputes them at boot), the current clocks, boot id, uptime, boot-time properties."""
    cpuinfo = tree / "proc" / "cpuinfo"
    text = cpuinfo.read_text()
    text = re.sub(r"(?im)^(bogomips\s*:\s*)[\d.]+", lambda m: f"{m[1]}{secrets.randbelow(9000)}.17",
                  text)
    text = re.sub(r"(?m)^(cpu MHz\s*:\s*)[\d.]+", lambda m: f"{m[1]}{secrets.randbelow(4000)}.5",
                  text)
    cpuinfo.write_text(text)
    for cpu in range(len(parse_cpuinfo(text).cores)):
        cur = tree / "sys/devices/system/cpu" / f"cpu{cpu}" / "cpufreq" / "scaling_cur_freq"
        cur.parent.mkdir(parents=True, exist_ok=True)
        cur.write_text(f"{secrets.randbelow(3_000_000)}\n")
    (tree / "proc/sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (tree / "proc/sys/kernel/random/boot_id").write_text(f"{secrets.token_hex(16)}\n")
    (tree / "proc/uptime").write_text(f"{secrets.randbelow(10**6)}.12 1234.56\n")
    listing = tree / "getprop.txt"
    if listing.exists():
        boot = f"[ro.boottime.init]: [{secrets.randbelow(10**9)}]\n[sys.boot.reason]: [reboot]\n"
        listing.write_text(listing.read_text() + boot)


# -- what each device is ---------------------------------------------------------------------
EXPECTED = {
    # name: (cores, max clocks in kHz per cluster, product, board, soc, android)
    "pixel-8": ("4x Cortex-A510 + 4x Cortex-A715 + 1x Cortex-X3", (1704000, 2367000, 2914000),
                "Google Pixel 8", "", "zuma", "14"),
    "huawei-mate-20": ("4x Cortex-A55 + 2x Cortex-A76 + 2x Cortex-A76", (1805000, 1901000, 2600000),
                       "HUAWEI HMA-L29", "", "kirin980", "9"),
    "galaxy-s9-us": ("4x Kryo-3XX-Silver + 4x Kryo-3XX-Gold", (1766400, 2803200),
                     "samsung SM-G960U", "", "Qualcomm Technologies, Inc SDM845", "8.0.0"),
    "jetson-tx1": ("4x Cortex-A57", (0,), "", "", "jetson_tx1", ""),
    "raspberry-pi-5": ("4x Cortex-A76", (2400000,), "", "Raspberry Pi 5 Model B Rev 1.0",
                       "brcm,bcm2712", ""),
    "jetson-orin-nano": ("6x Cortex-A78AE", (1510400,), "",
                         "NVIDIA Jetson Orin Nano Developer Kit", "nvidia,tegra234", ""),
}


def test_every_recorded_device_has_an_expectation() -> None:
    assert sorted(EXPECTED) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_recorded_device_is_named_by_its_cores_board_and_build(name: str, tmp_path: Path) -> None:
    cores, clocks, product, board, soc, android = EXPECTED[name]
    ident = probe(DEVICES / name, tmp_path)
    assert ident.cpu_model == cores
    assert tuple(c.max_freq_khz for c in ident.clusters) == clocks
    assert sum(c.count for c in ident.clusters) == ident.cpu_count
    assert [cpu for c in ident.clusters for cpu in c.cpus] == list(range(ident.cpu_count))
    assert (ident.product_model, ident.board_model, ident.soc, ident.android_version) == (
        product, board, soc, android)
    on_the_wire = [wire.cluster_to_proto(c) for c in ident.clusters]
    assert tuple(wire.cluster_from_proto(c) for c in on_the_wire) == ident.clusters


def test_big_little_clusters_carry_exact_ids(tmp_path: Path) -> None:
    pixel = probe(DEVICES / "pixel-8", tmp_path)
    assert [(c.ident, c.cpus) for c in pixel.clusters] == [
        ("0x41:0xd46 r1p1", (0, 1, 2, 3)), ("0x41:0xd4d r1p0", (4, 5, 6, 7)),
        ("0x41:0xd4e r1p0", (8,))]
    assert pixel.build_fingerprint == (
        "google/shiba/shiba:14/UQ1A.240105.004/11206848:userdebug/dev-keys")
    # Kirin 980: the same core (HiSilicon's id for a Cortex-A76) at two clocks is two clusters,
    # and one kind in the signature.
    mate = probe(DEVICES / "huawei-mate-20", tmp_path)
    assert [c.cpus for c in mate.clusters] == [(0, 1, 2, 3), (4, 5), (6, 7)]
    assert mate.cpu_signature == "0-3=0x41:0xd05 r1p0;4-7=0x48:0xd40 r1p0"


def test_no_two_devices_share_a_fingerprint(tmp_path: Path) -> None:
    prints = {name: probe(DEVICES / name, tmp_path).fingerprint for name in NAMES}
    assert len(set(prints.values())) == len(NAMES), prints
    # Without Android's properties (an app that may not run getprop) the cores and the device
    # tree still tell them apart: the old probe read neither, and its fingerprint was the same
    # for any two phones with one Android version and core count.
    bare = {name: probe(DEVICES / name, tmp_path, with_getprop=False).fingerprint
            for name in NAMES}
    assert len(set(bare.values())) == len(NAMES), bare


@pytest.mark.parametrize("name", NAMES)
def test_the_same_device_after_a_reboot_keeps_its_fingerprint(name: str, tmp_path: Path) -> None:
    tree = copy_of(name, tmp_path)
    before = probe(tree, tmp_path)
    reboot(tree)
    after = probe(tree, tmp_path)
    assert after == before and after.fingerprint == before.fingerprint


def test_this_machine_after_a_reboot_keeps_its_fingerprint(tmp_path: Path) -> None:
    """This host's own /proc/cpuinfo (x86 prints BogoMIPS and clocks that change each boot)."""
    tree = tmp_path / "this-host"
    (tree / "proc").mkdir(parents=True)
    shutil.copy("/proc/cpuinfo", tree / "proc" / "cpuinfo")
    before = probe(tree, tmp_path)
    assert before.clusters, "this machine's /proc/cpuinfo names no cores"
    reboot(tree)
    assert probe(tree, tmp_path).fingerprint == before.fingerprint


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_what_changes_the_fingerprint_and_what_does_not(tmp_path: Path) -> None:
    base = probe(DEVICES / "pixel-8", tmp_path).fingerprint

    twin = copy_of("pixel-8", tmp_path)  # another unit of the model: another serial number
    _edit(twin / "getprop.txt", "[39061FDJH005AB]", "[41021FDJH00Q7C]")
    assert probe(twin, tmp_path).fingerprint == base

    ota = copy_of("pixel-8", tmp_path)  # the same phone after an OS update
    _edit(ota / "getprop.txt", "UQ1A.240105.004/11206848", "AP1A.240305.019/11425634")
    assert probe(ota, tmp_path).fingerprint != base

    sibling = copy_of("pixel-8", tmp_path)  # same SoC and cores, another phone
    _edit(sibling / "getprop.txt", "[ro.product.model]: [Pixel 8]",
          "[ro.product.model]: [Pixel 8 Pro]")
    assert probe(sibling, tmp_path).fingerprint != base

    core = copy_of("pixel-8", tmp_path)  # one core of another revision
    text = (core / "proc/cpuinfo").read_text().split("\n\n")
    text[8] = text[8].replace("CPU revision\t: 0", "CPU revision\t: 1")
    (core / "proc/cpuinfo").write_text("\n\n".join(text))
    assert probe(core, tmp_path).fingerprint != base

    nnapi = probe(DEVICES / "pixel-8", tmp_path, providers=(*PROVIDERS, "NnapiExecutionProvider"))
    assert nnapi.fingerprint != base

    pi = probe(DEVICES / "raspberry-pi-5", tmp_path).fingerprint
    other_pi = copy_of("raspberry-pi-5", tmp_path)
    _edit(other_pi / "proc/cpuinfo", "Serial\t\t: 3e5a91c07d2b6f48", "Serial\t\t: 7f00aa31c9d2e015")
    assert probe(other_pi, tmp_path).fingerprint == pi
    cm5 = copy_of("raspberry-pi-5", tmp_path)  # same SoC on another board
    (cm5 / "proc/device-tree/model").write_bytes(b"Raspberry Pi Compute Module 5 Rev 1.0\0")
    assert probe(cm5, tmp_path).fingerprint != pi


# -- parsing ---------------------------------------------------------------------------------
def test_old_32bit_cpuinfo_shares_its_ids_among_cores() -> None:
    text = ("Processor\t: ARMv7 Processor rev 10 (v7l)\nprocessor\t: 0\nBogoMIPS\t: 597.12\n\n"
            "processor\t: 1\nBogoMIPS\t: 597.12\n\nFeatures\t: swp half thumb\n"
            "CPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x2\n"
            "CPU part\t: 0xc09\nCPU revision\t: 10\n\nHardware\t: Tuna\nSerial\t\t: 0149\n")
    info = parse_cpuinfo(text)
    assert {n: k.ident for n, k in info.cores.items()} == {0: "0x41:0xc09 r2p10",
                                                            1: "0x41:0xc09 r2p10"}
    assert info.cores[0].name == "Cortex-A9"
    assert info.extra["Hardware"] == "Tuna"


def test_unknown_core_ids_are_shown_as_numbers() -> None:
    assert core_name(0x41, 0xD0B) == "Cortex-A76"
    assert core_name(0x48, 0xD40) == "Cortex-A76"
    assert core_name(0x41, 0xFFF) == "0x41:0xfff"
    assert core_name(0x99, 0x001) == "0x99:0x001"


def test_cpu_lists() -> None:
    assert parse_cpu_list("4-7") == (4, 5, 6, 7)
    assert parse_cpu_list("0,2,4-5") == (0, 2, 4, 5)
    assert parse_cpu_list("0 1 2 3\n") == (0, 1, 2, 3)
    for bad in ("", "a", "3-1", "1-", "-1", "1,,2"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpu_list(bad)
    assert format_cpu_list((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    for cpus in ((0,), (1, 3, 5), tuple(range(9))):
        assert parse_cpu_list(format_cpu_list(cpus)) == cpus


def test_getprop_listing(tmp_path: Path) -> None:
    listing = DEVICES / "pixel-8" / "getprop.txt"
    props = parse_getprop("garbage\n" + listing.read_text() + "[broken: [x]\n")
    assert props["ro.product.model"] == "Pixel 8"
    assert read_props(stand_in_getprop(tmp_path, listing))["ro.product.manufacturer"] == "Google"
    assert "ro.serialno" not in read_props(stand_in_getprop(tmp_path, listing))
    assert read_props(str(tmp_path / "no-such-getprop")) == {}
    assert read_props(None) == {}


def test_this_machine_is_probed_whole() -> None:
    ident = probe_identity()
    assert sum(c.count for c in ident.clusters) == os.cpu_count() == ident.cpu_count
    assert ident.pinned_cpus == tuple(sorted(os.sched_getaffinity(0)))
    assert len(ident.fingerprint) == 16 and ident.fingerprint == probe_identity().fingerprint


# -- the daemon says where it is pinned ------------------------------------------------------
def test_info_lists_the_clusters_and_the_pinned_cores() -> None:
    """A real daemon pinned with `serve --cpus 0`; `netadapt-bench info` from the host."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("pinning is only visible with two or more CPUs")
    with start_local_daemon(cpus=[0]) as pinned, start_local_daemon() as free:
        out, err = io.StringIO(), io.StringIO()
        assert bench_cli.main(["--device", pinned.address, "info"], out, err) == 0, err.getvalue()
        rows = dict(re.split(r"\s{2,}", line, maxsplit=1)
                    for line in out.getvalue().splitlines()[2:])
        local = probe_identity()
        assert rows["pinned"] == f"cpu0: 1x {local.clusters[0].core}"
        assert rows["clusters"].startswith(f"{local.clusters[0].count}x {local.clusters[0].core}")
        out = io.StringIO()
        assert bench_cli.main(["--device", free.address, "--json", "info"], out, err) == 0
        info = json.loads(out.getvalue())
        assert info["pinned_cpus"] == sorted(os.sched_getaffinity(0))
        assert [c["cpus"] for c in info["clusters"]] == [list(c.cpus) for c in local.clusters]
        # Pinning is a condition of the run, not part of what the device is.
        with pinned.client() as a, free.client() as b:
            assert a.device_info().fingerprint == b.device_info().fingerprint



def test_the_pinned_cores_are_a_condition_of_every_timing_and_table(tmp_path: Path) -> None:
    """A table measured on a daemon pinned to cpu0 is not silently reused by an unpinned one
    (on a big.LITTLE phone the clusters differ several-fold); both sides name the cores."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("pinning is only visible with two or more CPUs")
    from device_server.spec import LayerSpec, SessionSpec
    from host.device.table_builder import identity_for
    from lut.errors import LutConditionsMismatch
    from lut.store import LutStore

    spec = LayerSpec.create("conv2d", (1, 8, 8, 8), out_channels=8, kernel=3, padding=1)
    with start_local_daemon(cpus=[0]) as pinned, start_local_daemon() as free:
        with pinned.client() as a, free.client() as b:
            assert a.measure(spec).conditions.pinned_cpus == (0,)
            assert b.measure(spec).conditions.pinned_cpus == ()
            ours, theirs = (identity_for(c.device_info(), SessionSpec()) for c in (a, b))
    assert ours.conditions.pinned_cpus == (0,) and theirs.conditions.pinned_cpus == ()
    assert "cpus=0" in ours.describe()
    path = tmp_path / "pinned.sqlite"
    LutStore.open(path, ours).close()
    with LutStore.open(path, ours) as store:  # the identity survives the file
        assert store.identity == ours
    with pytest.raises(LutConditionsMismatch, match="pinned_cpus"):
        LutStore.open(path, theirs)
