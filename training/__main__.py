"""`python -m training FLAGS` == `did train FLAGS`; torchrun launches it as `torchrun ... -m training FLAGS`."""
import sys

from .cli import main

sys.exit(main(["train", *sys.argv[1:]]))
