"""Control plane: cluster config, embedded Redis, Ray actors and the `baton serve` launcher.

Only `baton.cli` imports this package (DESIGN §1); it imports every other package.
"""
