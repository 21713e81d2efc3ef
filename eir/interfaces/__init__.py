"""What the network sees: S13 (eir.interfaces.s13), the N5g-eir service (sbi), the admin API
(api) and /metrics (metrics). They reach the running server only through
eir.interfaces.ports.ServerView, never the server object."""
