"""The ClientApp and local (DP-SGD) training. Imports ``fedsim`` only, never ``server``."""
