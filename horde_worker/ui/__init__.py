"""What the volunteer sees: logs and the live status line."""
