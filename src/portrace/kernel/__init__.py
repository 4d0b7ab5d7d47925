"""The kernel side: engines that load bpf/ programs and turn their records into typed events and
port snapshots (engine: the interface and its toolkit; chooser: the only importer of an engine)."""
