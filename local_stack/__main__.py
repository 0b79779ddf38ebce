"""`python -m local_stack`: the same as the `policycast` console script (`up` included)."""

from local_stack.cli import main

if __name__ == "__main__":
    main()
