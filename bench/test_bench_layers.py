"""Layer-level contenders: stock Keras, fastrnn.keras (both inside
tf.function, same weights) and PyTorch's nn.LSTM/nn.RNN when installed."""
import pytest

from fastrnn.bench import LAYER_CONTENDERS


@pytest.mark.parametrize("contender", LAYER_CONTENDERS)
def test_layer(run_benchmark, contender, case, pass_):
    run_benchmark(contender, case, pass_)
