"""The one base class of every error a user can fix without touching code.

Config mistakes, missing or damaged input files, a run directory in use: the message names the problem and the fix.
Entry points (`latentforge.train.entry.run_main`) print such an error as one line on rank 0 and exit with code 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's config, files or launch; the message alone tells them what to change."""


def user_error_types() -> tuple:
    """What an entry point reports as a user's mistake: ours, a missing file, and Hydra's / OmegaConf's override and
    composition errors (an unknown recipe or key)."""
    types = [UserError, FileNotFoundError]
    try:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        types += [HydraException, OmegaConfBaseException]
    except ImportError:
        pass
    return tuple(types)


def entry_point(prog: str):
    """Decorate a console script's `main(argv=None) -> int`: a user error becomes one line on stderr (rank 0 only,
    as torchrun numbers ranks) and exit code 2; any other exception keeps its traceback."""
    import functools
    import os
    import sys

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except user_error_types() as error:
                if os.environ.get("RANK", "0") == "0":
                    message = " ".join(str(error).split()) or type(error).__name__
                    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
                return 2

        return run

    return wrap
