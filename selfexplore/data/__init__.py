"""Data: LightningDataModules for SFT (gold / RFT rationales) and preference pairs (DPO).

Kept import-light on purpose: import the submodules you need
(`selfexplore.data.preference`, `selfexplore.data.sft`, ...).
"""
