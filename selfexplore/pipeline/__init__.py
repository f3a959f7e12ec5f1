"""The Self-Explore pipeline: rounds, state, report; `run_pipeline(config)`."""
