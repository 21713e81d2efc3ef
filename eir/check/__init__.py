"""The check both interfaces call (decide, observe, count, audit) and the observations it
records (backends, dumps, the clone report, the grandfathering index). Imports eir.lists and
eir.core."""
