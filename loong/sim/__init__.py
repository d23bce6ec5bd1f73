"""The discrete-event simulator: workloads (`workloads.py`: request length sets and trace
replays read from files the user points at) and arrivals (`arrivals.py`: Poisson and gamma
processes, real trace times); it drives the same GlobalManager as the real executor, with a
cost model in place of the GPUs. Pure Python + numpy: this package never imports torch, and
importing it loads nothing heavy.
"""
