"""The captive portal: the client-facing HTTP API and pages, served on the LAN only."""
