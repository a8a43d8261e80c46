"""torchrun (`torch.distributed.run`) as run.train's launcher starts it, minus torchrun's
own traceback when it ends badly: the ranks have printed their one-line errors already, so
a failed rank ends this process with that rank's exit code (2 for bad input), and a
signal, which the ranks answered with a checkpoint, with 128 + its number."""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def exit_code(failure: ChildFailedError) -> int:
    exited = [f.exitcode for f in failure.failures.values() if f.exitcode > 0]
    if exited:  # the others were stopped by torchrun once this one failed
        return exited[0]
    for rank, f in sorted(failure.failures.items()):  # killed from outside (the OOM killer, say)
        print(f"error: rank {rank} was killed by {signal.Signals(-f.exitcode).name}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        main()
    except ChildFailedError as e:
        sys.exit(exit_code(e))
    except SignalException as e:
        sys.exit(128 + e.sigval)
