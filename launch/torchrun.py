"""torchrun (torch.distributed.run) for the launchers: the same command line, one line instead of a traceback
when torchrun itself is signalled.

A terminal's Ctrl-C, a `kill` of the launcher or SLURM's SIGUSR1 reach torchrun, which forwards the signal to
its workers (they save a checkpoint at an agreed step and each print one line), waits for them and then raises
SignalException out of its main loop: a traceback of torch's internals that says nothing the workers' lines
have not. Here it is one line, and the exit code is 128 + the signal's number, as a shell reports a command a
signal stopped (130 for Ctrl-C). Anything else torchrun raises (a worker's failure) is left as torchrun
reports it.
"""
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as stop:   # a second signal while the workers stop raises again: the same line
        print(f"torchrun: stopped by {stop.sigval.name}; its workers' lines above say what they saved",
              file=sys.stderr, flush=True)
        sys.exit(128 + stop.sigval)
