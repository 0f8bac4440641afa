"""Serving glue: tritonserver process management and Python-backend model bodies."""
