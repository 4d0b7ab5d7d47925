"""Facts about a failure beyond the engine's: who owns each holder (unit, container, pod),
the failing process's facts, and how much of the ephemeral port range is taken."""
