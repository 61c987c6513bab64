"""``python -m fastrnn ...``: the same as the ``fastrnn`` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
