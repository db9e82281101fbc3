"""Node patching for Hyper-V / VMM clusters, written on the engine."""
