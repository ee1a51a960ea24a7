"""The command lines: one parser base, one set of exit codes and device options (`common`).

- `netadapt_host`: `netadapt-host [adapt|lut] …` (`adapt` the default command), with the
  sub-commands in `adapt` and `lut`.
- `netadapt_bench`: `netadapt-bench`, standalone layer and model benchmarking (no torch).
- `netadapt_deploy`: `netadapt-deploy`, the daemon onto a phone or board (host/deploy).
- `table`: plain-text tables for the terminal.
"""
