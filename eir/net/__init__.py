"""Network plumbing the interfaces share: TLS and the peer allowlist, connection limits and
overload admission, the HTTP/1.1 guard. Imports eir.core only."""
