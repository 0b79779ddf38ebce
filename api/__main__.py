"""`python -m api`: the manager's commands (`policycast` without `up`, which is `local_stack`'s)."""

from api.cli import main

if __name__ == "__main__":
    main()
