"""The running process: listeners and connections (server), workers and the supervisor
(workers), and the bootstrap that wires lists, check and interfaces together. The top layer
below the command-line tools."""
