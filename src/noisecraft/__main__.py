"""``python -m noisecraft ...``: the same command line as the ``noisecraft`` program."""

from noisecraft.cli.main import run

run()
