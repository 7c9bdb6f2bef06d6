"""`python -m cloud`: see cloud/cli.py."""

from cloud.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
