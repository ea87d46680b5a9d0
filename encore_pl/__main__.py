"""`python -m encore_pl COMMAND ...`: the same as `encore-pl COMMAND ...` (encore_pl/console.py)."""

from encore_pl.console import main

if __name__ == "__main__":
    main()
