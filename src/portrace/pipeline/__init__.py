"""The traced path that runs the stages in order: ring records in, failures queued newest
first (inbox), each observed, judged and handed to the sinks (tracer)."""
