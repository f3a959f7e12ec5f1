"""Training: LightningModules (SFT, step-level DPO), pure losses, optimizer/scheduler config.

Kept import-light on purpose: import the submodules you need
(`selfexplore.training.losses`, `selfexplore.training.optim`, ...).
"""
