"""The ``ccat-wfm`` console script: the Rust command line, run in this interpreter."""

import sys

from ccat_workflow_manager import _core


def main() -> None:
    sys.exit(_core.cli_main([sys.argv[0], *sys.argv[1:]]))


if __name__ == "__main__":
    main()
