"""fastrnn: fused, compiled tanh-RNN and LSTM kernels for the CPU.

``fastrnn.ops`` holds the kernels' NumPy-facing API; ``fastrnn.keras`` holds
drop-in Keras 3 layers (it imports TensorFlow; ``import fastrnn`` does not).
"""
from ._backend import available_backends, get_num_threads, set_num_threads

__version__ = "0.1.0"
__all__ = ["available_backends", "set_num_threads", "get_num_threads",
           "__version__"]
