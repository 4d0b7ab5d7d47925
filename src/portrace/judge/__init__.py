"""Pure judgement of an observation: which sockets block the call (diagnose.RULES, each citing
its kernel function) and the verdict with its advice, one function per cause, in shared phrases."""
