"""The restic repository format (version 2): objects, packs, index, trees, snapshots, locks."""
