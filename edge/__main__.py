"""`python -m edge`: see edge/cli.py."""

from edge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
