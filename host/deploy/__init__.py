"""Shipping the measurement daemon to a device: `netadapt-deploy deploy|status|stop`.

Torch-free: it needs only the standard library, ssh (and adb for a USB-attached phone) on the
host, and grpcio to check that the deployed daemon answers.
"""
