"""Names of ARM CPU cores from the ids an arm64 kernel prints in /proc/cpuinfo.

Each core's MIDR register gives an implementer (0x41 Arm, 0x51 Qualcomm, ...) and a part number
within it; `CPU implementer` and `CPU part` in /proc/cpuinfo are those two fields. The names
follow the Linux kernel (arch/arm64/include/asm/cputype.h) and util-linux's lscpu, the two
tables everyone reads them from. An id missing here is shown as its numbers, never guessed.
"""

from __future__ import annotations

__all__ = ["IMPLEMENTERS", "core_name", "implementer_name"]

IMPLEMENTERS: dict[int, str] = {
    0x41: "Arm",
    0x42: "Broadcom",
    0x43: "Cavium",
    0x46: "Fujitsu",
    0x48: "HiSilicon",
    0x4E: "NVIDIA",
    0x51: "Qualcomm",
    0x53: "Samsung",
    0x61: "Apple",
    0x6D: "Microsoft",
    0xC0: "Ampere",
}

_PARTS: dict[int, dict[int, str]] = {
    0x41: {
        0xB76: "ARM1176", 0xC07: "Cortex-A7", 0xC08: "Cortex-A8", 0xC09: "Cortex-A9",
        0xC0D: "Cortex-A17", 0xC0E: "Cortex-A17", 0xC0F: "Cortex-A15",
        0xD01: "Cortex-A32", 0xD02: "Cortex-A34", 0xD03: "Cortex-A53", 0xD04: "Cortex-A35",
        0xD05: "Cortex-A55", 0xD06: "Cortex-A65", 0xD07: "Cortex-A57", 0xD08: "Cortex-A72",
        0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76", 0xD0C: "Neoverse-N1",
        0xD0D: "Cortex-A77", 0xD0E: "Cortex-A76AE", 0xD40: "Neoverse-V1", 0xD41: "Cortex-A78",
        0xD42: "Cortex-A78AE", 0xD43: "Cortex-A65AE", 0xD44: "Cortex-X1", 0xD46: "Cortex-A510",
        0xD47: "Cortex-A710", 0xD48: "Cortex-X2", 0xD49: "Neoverse-N2", 0xD4A: "Neoverse-E1",
        0xD4B: "Cortex-A78C", 0xD4C: "Cortex-X1C", 0xD4D: "Cortex-A715", 0xD4E: "Cortex-X3",
        0xD4F: "Neoverse-V2", 0xD80: "Cortex-A520", 0xD81: "Cortex-A720", 0xD82: "Cortex-X4",
        0xD84: "Neoverse-V3", 0xD85: "Cortex-X925", 0xD87: "Cortex-A725", 0xD8E: "Neoverse-N3",
    },
    0x42: {0x00F: "Brahma-B15", 0x100: "Brahma-B53", 0x516: "ThunderX2"},
    0x43: {0x0A1: "ThunderX", 0x0AF: "ThunderX2", 0x0B8: "ThunderX3"},
    0x46: {0x001: "A64FX"},
    0x48: {0xD01: "TaiShan-v110", 0xD02: "TaiShan-v120", 0xD40: "Cortex-A76",
           0xD41: "Cortex-A77"},
    0x4E: {0x000: "Denver", 0x003: "Denver-2", 0x004: "Carmel"},
    0x51: {
        0x00F: "Scorpion", 0x02D: "Scorpion", 0x04D: "Krait", 0x06F: "Krait",
        0x201: "Kryo", 0x205: "Kryo", 0x211: "Kryo",
        0x800: "Kryo-2XX-Gold", 0x801: "Kryo-2XX-Silver", 0x802: "Kryo-3XX-Gold",
        0x803: "Kryo-3XX-Silver", 0x804: "Kryo-4XX-Gold", 0x805: "Kryo-4XX-Silver",
        0xC00: "Falkor", 0xC01: "Saphira", 0x001: "Oryon",
    },
    0x53: {0x001: "Exynos-M1", 0x002: "Exynos-M3", 0x003: "Exynos-M4", 0x004: "Exynos-M5"},
    0x61: {0x022: "Icestorm-M1", 0x023: "Firestorm-M1", 0x032: "Blizzard-M2",
           0x033: "Avalanche-M2"},
    0xC0: {0xAC3: "Ampere-1", 0xAC4: "Ampere-1a"},
}


def implementer_name(implementer: int) -> str:
    return IMPLEMENTERS.get(implementer, f"0x{implementer:02x}")


def core_name(implementer: int, part: int) -> str:
    """'Cortex-A78' for (0x41, 0xd41); '0x41:0xd99' for an id this table does not know."""
    name = _PARTS.get(implementer, {}).get(part)
    return name if name else f"0x{implementer:02x}:0x{part:03x}"
