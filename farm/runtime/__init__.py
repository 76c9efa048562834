"""Runtime: running a plan on Ray. `cluster` is the only module that imports ray."""
