"""Self-Explore's data side: RFT set, outcome pairs, first-pit search and granular pairs."""

from selfexplore.explore.builders import build_outcome_pairs, build_rft_set, sample_stats
from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.granular import build_granular_pairs, explore_stats
from selfexplore.explore.pit import Rationale, find_first_pits
from selfexplore.explore.stage import run_explore_stage

__all__ = [
    "ExploreConfig", "Rationale", "build_granular_pairs", "build_outcome_pairs", "build_rft_set",
    "explore_stats", "find_first_pits", "run_explore_stage", "sample_stats",
]
