"""Ray Serve application (issue: serve). Empty until that issue lands."""
