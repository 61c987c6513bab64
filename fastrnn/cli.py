"""The ``fastrnn`` command: argument parsing and dispatch.

    fastrnn demo [--epochs N --units N --seq-len N --text PATH --save M.keras ...]
    fastrnn generate MODEL.keras [--prompt TEXT --length N --temperature T]
    fastrnn info
    fastrnn bench [ARGS...]          (see ``fastrnn bench --help``)

The work is done elsewhere (``fastrnn.demo``, ``fastrnn.info``,
``fastrnn.bench``), imported only by the command that needs it.  A problem
the user can fix is printed as one line on stderr, with exit status 1;
a bad flag gives argparse's usage message and status 2.
"""
import argparse
import sys

from . import __version__

PROG = "fastrnn"


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_demo(sub):
    from ._backend import BACKENDS
    from .demo import DATA_SOURCE, DemoConfig
    d = DemoConfig()
    p = sub.add_parser(
        "demo", help="train a character-level LSTM language model with "
        "fastrnn.keras.LSTM, compare with keras.layers.LSTM, sample text",
        description="Train Embedding -> LSTM -> Dense(softmax) as a "
        "character-level language model with fastrnn.keras.LSTM, then the "
        "same model from the same initial weights with keras.layers.LSTM; "
        "print time per epoch, the speed-up and the final losses, then text "
        "sampled from the trained model.")
    pos, nonneg, num = _int_at_least(1), _int_at_least(0), _positive_float
    p.add_argument("--text", metavar="PATH", default=d.text,
                   help=f"a UTF-8 text file to learn (default: {DATA_SOURCE})")
    p.add_argument("--max-chars", type=nonneg, default=d.max_chars, metavar="N",
                   help="use the first N characters of the text, 0 for all "
                   "(default: %(default)s)")
    p.add_argument("--epochs", type=pos, default=d.epochs, metavar="N",
                   help="default: %(default)s")
    p.add_argument("--units", type=pos, default=d.units, metavar="N",
                   help="LSTM units (default: %(default)s)")
    p.add_argument("--embedding-dim", type=pos, default=d.embedding_dim, metavar="N",
                   help="default: %(default)s")
    p.add_argument("--seq-len", type=pos, default=d.seq_len, metavar="N",
                   help="characters per training sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=pos, default=d.batch_size, metavar="N",
                   help="default: %(default)s")
    p.add_argument("--learning-rate", type=num, default=d.learning_rate, metavar="LR",
                   help="Adam's learning rate (default: %(default)s)")
    p.add_argument("--seed", type=nonneg, default=d.seed, metavar="N",
                   help="seed for the initial weights, shuffling and sampling "
                   "(default: %(default)s)")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default=d.backend,
                   help="fastrnn's kernels (default: %(default)s, the "
                   "fastest available or FASTRNN_BACKEND)")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="train only with fastrnn.keras.LSTM")
    p.add_argument("--save", metavar="PATH.keras", default=d.save,
                   help="save the trained fastrnn model (with its vocabulary)")
    p.add_argument("--sample-length", type=nonneg, default=d.sample_length, metavar="N",
                   help="characters of text to sample (default: %(default)s)")
    p.add_argument("--temperature", type=num, default=d.temperature, metavar="T",
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--threads", type=pos, default=None, metavar="N",
                   help="threads for fastrnn's kernels (default: "
                   "OMP_NUM_THREADS, else the cores)")


def _add_generate(sub):
    p = sub.add_parser(
        "generate", help="sample text from a model saved by `fastrnn demo --save`",
        description="Print PROMPT followed by text sampled from a model saved "
        "by `fastrnn demo --save` (its vocabulary is stored in the file).")
    p.add_argument("model", metavar="MODEL", help="a .keras file saved by fastrnn demo")
    p.add_argument("--prompt", default=None,
                   help="text to start from (default: a newline)")
    p.add_argument("--length", type=_int_at_least(0), default=300, metavar="N",
                   help="characters to generate (default: %(default)s)")
    p.add_argument("--temperature", type=_positive_float, default=0.8, metavar="T",
                   help="below 1: more likely characters; above: more varied "
                   "(default: %(default)s)")
    p.add_argument("--seed", type=_int_at_least(0), default=None, metavar="N",
                   help="seed for the sampling (default: random)")


def build_parser():
    """The ``fastrnn`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="fastrnn: fused, compiled RNN and LSTM kernels "
        "for the CPU, with drop-in Keras 3 layers.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_generate(sub)
    sub.add_parser("info", help="show the version, backends, threads, BLAS, "
                   "compiler and TensorFlow/Keras versions",
                   description="Show what fastrnn runs with here.")
    sub.add_parser("bench", add_help=False,
                   help="benchmark the kernels (see `fastrnn bench --help`)")
    return parser


def _run(args):
    if args.command == "info":
        from .info import report
        print(report())
    elif args.command == "generate":
        from .demo import run_generate
        run_generate(args.model, args.prompt, length=args.length,
                     temperature=args.temperature, seed=args.seed)
    elif args.command == "demo":
        import dataclasses

        from . import set_num_threads
        from .demo import DemoConfig, run_demo
        if args.threads is not None:
            set_num_threads(args.threads)
        fields = {f.name for f in dataclasses.fields(DemoConfig)}
        run_demo(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def main(argv=None):
    """Run the ``fastrnn`` command with ``argv`` (default: sys.argv[1:]);
    returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    from .demo import DemoError
    try:
        return _run(args)
    except DemoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
