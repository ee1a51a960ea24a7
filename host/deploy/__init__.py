"""Shipping the measurement daemon to a device: `netadapt-deploy deploy|status|stop|wheels`.

Torch-free: it needs the standard library, ssh (and adb for a USB-attached phone) on the host,
grpcio to check that the deployed daemon answers, packaging to match wheels to the device, and
pip to download them (`wheels`, `deploy --download-wheels`).
"""
