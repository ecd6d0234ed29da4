"""Training math, the per-worker loop and the planner (training issue)."""
