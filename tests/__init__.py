"""Test suite for netadapt (host and device sides)."""
