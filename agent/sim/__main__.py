"""``python -m agent.sim``: run the simulated engine (see agent.sim.server for the flags)."""

from agent.sim.server import main

if __name__ == "__main__":
    main()
