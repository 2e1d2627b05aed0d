"""What a training run is before any rank starts: its config schema, its RunPlan (the derived
numbers and the one layout check), the config checks, and the memory planner."""
