"""Smoke tier: every script under experiments/ runs its --quick mode."""
