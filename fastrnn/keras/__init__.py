"""Drop-in Keras 3 layers on fastrnn's kernels: ``LSTM`` and ``SimpleRNN``.

Importing this package imports Keras (and TensorFlow through it) and
registers both layers with Keras under the package name "fastrnn", so
``.keras`` files that use them load after ``import fastrnn.keras``.
"""
from .layers import LSTM, SimpleRNN

__all__ = ["LSTM", "SimpleRNN"]
