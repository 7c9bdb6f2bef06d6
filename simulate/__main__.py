"""`python -m simulate`: see simulate/cli.py."""

from simulate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
