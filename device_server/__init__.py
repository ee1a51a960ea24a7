"""netadapt measurement daemon: builds ONNX graphs of layer variants and times them with ONNX
Runtime. Runs without torch (it is what `make deploy-device` ships to a phone)."""

__version__ = "0.1.0"
