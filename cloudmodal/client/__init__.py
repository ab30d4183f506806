"""The client side: HTTP transport to a control plane, app sessions, call mechanics."""
