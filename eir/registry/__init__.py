"""Lists from a national registry (DIRBS-style CEIR): formats, snapshots, sync."""
