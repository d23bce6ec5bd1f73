"""Scheduling policies; each returns `StepPlan`s and updates its state from `StepResult`s."""
