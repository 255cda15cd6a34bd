"""facelab: train, compare and use monocular 3D face reconstruction methods.

Layers, top to bottom: ``config`` and ``assets``; ``facemodel`` (the shared face model);
``render`` (differentiable rendering); ``data`` (shards and DataModules); ``nets`` and ``losses``
(building blocks); ``methods`` (LightningModules, registered by name); ``eval`` and ``viz``.
"""

__version__ = "0.1.0"
