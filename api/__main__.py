"""`python -m api`: the same as the `policycast` console script."""

from api.cli import main

if __name__ == "__main__":
    main()
