"""Code generated from protos/ by `nox -s protos`; do not edit."""
