"""Harvesting idle Slurm GPUs for the pool: `ctl harvest run | plan | status` (docs/harvest.md).

    slurm.py    the one adapter over sinfo / scontrol -d show node / squeue / sbatch / scancel
    model.py    settings, the views decide reads, the plan it returns, the GPU-hour budget
    decide.py   one round as a pure function: job state machine, budget, acquisitions
    acquire.py  idle GPUs as obtainable capacity in the planner's MILP (one decision); a baseline
    config.py   start-time checks (unknown partition, unmapped GRES type, unpriced GPU type)
    live.py     what a round reads from etcd, at one revision
    daemon.py   the leader-elected, fenced loop that carries plans out
"""
