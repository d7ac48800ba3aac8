"""The ServerApp, strategies and privacy accounting. Imports ``fedsim`` only, never ``clients``."""
