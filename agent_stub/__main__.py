"""`python -m agent_stub`: the same as the `policycast-agent` console script."""

from agent_stub.cli import main

if __name__ == "__main__":
    main()
