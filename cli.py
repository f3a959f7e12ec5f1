"""Run `python cli.py ...` from a checkout; same as the `selfexplore` console script."""

from selfexplore.cli import main

if __name__ == "__main__":
    main()
