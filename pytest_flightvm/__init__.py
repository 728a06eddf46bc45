"""pytest-flightvm: real, cached, cloud-init seeded libvirt VMs for E2E tests."""

__version__ = "0.1.0"
