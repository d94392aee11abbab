"""Model families the playground implements natively (no remote code)."""
