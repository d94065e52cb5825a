"""Conversion to ONNX/TFLite with parity checks, and the runner that times exported files."""
