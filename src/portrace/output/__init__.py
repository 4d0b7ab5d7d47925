"""Where judged events go: the terminal renderer, JSON lines, evidence files and their
rotation, the postmortem report, and Prometheus metrics."""
