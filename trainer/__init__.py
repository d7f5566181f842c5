"""Ray Train two-stage training (issue: trainer). Empty until that issue lands."""
