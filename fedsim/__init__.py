"""fedsim: federated, differentially private learning on Flower and Opacus.

Data moves one way through the package: ``config`` -> ``data`` and ``partition`` ->
client training (``clients/``) -> server aggregation and accounting (``server/``) ->
``results`` -> ``report``. ``fedsim`` itself imports neither ``clients`` nor ``server``.
"""

__version__ = "0.1.0"
