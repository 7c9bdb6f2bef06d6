"""`python -m models`: build the demo pair, export to ONNX, evaluate, list known real pairs."""

from models.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
