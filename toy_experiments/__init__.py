"""The paper's Figure 2 toy study: value-gradient estimators on a 2-D Gaussian mixture with an exact answer.

problem.py     the mixture, the linear reward, the tilted target and the analytic value gradient Psi
ddpm.py        schedule, epsilon-MLP, training, and the sampling steps as pure functions
estimators.py  one function per value-gradient estimator of Figure 2
run.py         `python -m toy_experiments.run [--quick] [--out DIR]`: every panel, CSV and markdown table
"""
