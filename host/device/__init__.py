"""Devices turned into trustworthy numbers: the one package that talks to measurement daemons.

- `client`: `DeviceClient`, one channel and stub per daemon, deadlines and bounded retries,
  dataclasses out (`results`: `Measurement`, `MeasureFailure`, `DeviceInfo`, `DeviceError`).
- `wire`: every conversion between those dataclasses and the protobuf messages (built on the
  daemon's own `device_server.wire`).
- `pool`: `DevicePool`, several daemons of one fingerprint sharing work, re-queueing a lost one's.
- `local_daemon`: a daemon started on loopback for a run (the embedded default).
- `connect`: `--device` addresses and tokens to an open pool.
- `whole_model`: whole networks in interleaved rounds until each 95% interval is tight.
- `table_builder`: filling a lookup table from a pool (resume, shuffle, drift and noise guards).
- `plan_estimate`: a plan's key count and time before measuring.
- `watch`: the device state of every reply checked (heat, throttling, load, charger).
- `noisy_neighbour`: seeded, bounded load to test and benchmark all of the above against.
- `summary`: one-line descriptions of a device (clusters, pinning).
"""
