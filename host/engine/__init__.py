"""The NetAdapt engine (Yang et al., ECCV 2018): adapt a network to a measured latency budget.

`config` holds the run's settings, `metrics` the resource the proposals are sized by,
`proposals` the per-group choice and evaluation of one pruning step, `executor` where the
proposals run, `netadapt` the loop with its checkpoints, and `report` what a run leaves behind.
"""
