"""Model architectures in plain torch (gpt-fast style). One file per architecture family."""
