"""F2PAD pixel refinement of flagged frames (needs the [refine] extra: torch)."""
