"""ControlNet: placeholder replaced below."""
