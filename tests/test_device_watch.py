"""Device state on every measurement, and what the host makes of it: heat, a throttled clock,
another load, a charger change are each warned once; a LUT build carries the warnings in its
report and pauses for a cool-down when asked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device_server import wire
from device_server.device_state import (
    Battery,
    CoreClock,
    DeviceState,
    LoadAverage,
    StateReader,
    ThermalZone,
)
from device_server.server import RunningServer
from device_server.spec import LayerSpec, SessionSpec
from host.device.client import DeviceClient
from host.device.pool import DevicePool
from host.device.table_builder import DriftGuard, build_table, identity_for
from host.device.watch import DeviceWatch, WatchLimits
from lut.store import LutStore
from tests.conftest import FAST_POLICY

SESSION = SessionSpec(intra_op_threads=1)


def _state(temp: float = 40.0, mhz: int = 2000, load: float = 0.5,
           charging: str = "Discharging") -> DeviceState:
    return DeviceState(
        load=LoadAverage(one_min=load, five_min=0.4, fifteen_min=0.3),
        clocks=(CoreClock(cpu=0, mhz=mhz), CoreClock(cpu=1, mhz=300)),
        thermal_zones=(ThermalZone(type="cpu", temp_c=temp),),
        batteries=(Battery(name="battery", status=charging, temp_c=30.0),))


def test_heat_is_warned_once_when_it_starts_and_again_after_it_clears() -> None:
    watch = DeviceWatch(WatchLimits(max_temp_rise_c=10))
    assert watch.observe(_state(40)) == []
    assert watch.observe(_state(49)) == []
    (hot,) = watch.observe(_state(52))
    assert "cpu is +12.0 °C above its first reading" in hot
    assert watch.observe(_state(55)) == []          # still hot: not repeated
    assert watch.is_hot(_state(55)) and not watch.is_hot(_state(45))
    assert watch.observe(_state(42)) == []          # cleared
    assert len(watch.observe(_state(53))) == 1      # hot again: warned again
    assert len(watch.warnings) == 2


def test_a_throttled_clock_other_load_and_a_charger_change_are_named() -> None:
    watch = DeviceWatch(threads=1)
    watch.observe(_state())
    # An idle core at 300 MHz is normal; the fastest core dropping is throttling.
    (clock,) = watch.observe(_state(mhz=1400))
    assert "1400 MHz, 70% of the 2000 MHz" in clock
    (load,) = watch.observe(_state(mhz=2000, load=3.1))
    assert "1-minute load 3.10 with 1 measuring thread" in load
    (power,) = watch.observe(_state(load=0.5, charging="Charging"))
    assert "from Discharging to Charging" in power
    assert watch.observe(_state(load=0.5, charging="Charging")) == []


def _readings(state: DeviceState) -> tuple[object, ...]:
    """Which readings a state holds (not their values, which move)."""
    return (state.load is not None, [c.cpu for c in state.clocks],
            [z.type for z in state.thermal_zones],
            [(b.name, b.percent is None, b.status == "", b.temp_c is None)
             for b in state.batteries])


def test_state_of_this_machine_is_read_and_comes_back_with_each_measurement(
        daemon: RunningServer) -> None:
    local = StateReader().read()
    assert local.load is not None and local.load.one_min >= 0  # readable on every Linux
    spec = LayerSpec.create("conv2d", (1, 8, 8, 8), out_channels=8, kernel=3, padding=1)
    with DeviceClient(daemon.address) as client:
        m = client.measure(spec, SESSION, FAST_POLICY)
        info = client.device_info()
    # The same readings, taken by the daemon, typed on the wire.
    assert _readings(m.state) == _readings(local) == _readings(info.state)
    assert m.to_dict()["device_state"] == {
        "load": {"one_min": m.state.load.one_min, "five_min": m.state.load.five_min,
                 "fifteen_min": m.state.load.fifteen_min},
        "clocks": [{"cpu": c.cpu, "mhz": c.mhz} for c in m.state.clocks],
        "thermal_zones": [{"type": z.type, "temp_c": z.temp_c} for z in m.state.thermal_zones],
        "batteries": [{"name": b.name, "percent": b.percent, "status": b.status,
                       "temp_c": b.temp_c} for b in m.state.batteries]}


def test_device_state_round_trips_the_wire_unread_parts_stay_unset() -> None:
    full = _state()
    assert wire.device_state_from_proto(wire.device_state_to_proto(full)) == full
    # Nothing readable (no loadavg, a battery with only a status): absent, not zero.
    sparse = DeviceState(batteries=(Battery(name="BAT0", status="Full"),))
    msg = wire.device_state_to_proto(sparse)
    assert not msg.HasField("load") and not msg.batteries[0].HasField("percent")
    assert not msg.batteries[0].HasField("temp_c")
    assert wire.device_state_from_proto(msg) == sparse


def test_lut_build_reports_device_warnings_and_pauses_to_cool_down(
        daemon: RunningServer, tmp_path: Path) -> None:
    specs = [LayerSpec.create("conv2d", (1, 8, 8, 8), out_channels=c, kernel=1)
             for c in (8, 16, 24, 32)]
    # Any load counts as "another load" here, and any drift as drift: both paths must fire.
    watch = DeviceWatch(WatchLimits(extra_load=-100.0), threads=1)
    guard = DriftGuard(window=2, threshold=-1.0, cooldown_s=0.3, poll_s=0.1,
                       policy=FAST_POLICY)
    with DevicePool([DeviceClient(daemon.address)]) as pool, \
            LutStore.open(tmp_path / "t.sqlite", identity_for(pool.info, SESSION)) as store:
        report = build_table(store, pool, specs, SESSION, FAST_POLICY, drift=guard,
                             progress=False, watch=watch)
        assert store.count("unit") == len(specs)  # nothing lost to the pauses
    assert len(report.state_warnings) == 1 and "something else is running" in \
        report.state_warnings[0]
    assert len(report.cooldowns) == 2                          # one per window
    assert all(0.25 <= c < 5 for c in report.cooldowns)        # waited its time, then went on


def test_battery_comes_from_termux_api_where_sysfs_hides_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "termux-battery-status"
    calls = tmp_path / "calls"
    tool.write_text("#!/bin/sh\necho x >> " + str(calls) + "\n"
                    'echo \'{"health": "GOOD", "percentage": 83, "plugged": "UNPLUGGED", '
                    '"status": "DISCHARGING", "temperature": 31.4, "current": -412}\'\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    # As on Android 10+: no readable power supply in sysfs.
    reader = StateReader(power_supplies=str(tmp_path / "none" / "*"))
    state = reader.read()
    assert state.batteries == (Battery(name="battery", percent=83, status="Discharging",
                                       temp_c=31.4),)
    reader.read()
    assert calls.read_text().count("x") == 1  # ~1 s a call on a phone: cached, not per reading
