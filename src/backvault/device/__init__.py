"""What this device keeps: settings, paths, the key cache, vault state, the daily schedule."""
