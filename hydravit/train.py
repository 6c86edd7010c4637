"""``python -m hydravit.train``: the training entry point (the loop lives in ``hydravit.training``)."""
import sys

from .training.loop import main

if __name__ == '__main__':
    sys.exit(main())
