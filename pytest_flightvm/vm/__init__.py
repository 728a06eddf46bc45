"""VM lifecycle on libvirt: domain XML, overlays, readiness, SSH, reaping."""
