"""The equipment lists: list entries, the native and registry formats, snapshots (compile,
read, the optional C lookup), the snapshot store, and sync from a drop directory or a registry
(fetch, manifest). Imports eir.core only."""
