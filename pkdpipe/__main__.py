"""`python -m pkdpipe ...`, which is also what `torchrun -m pkdpipe ...` runs on every rank."""

from pkdpipe_cli.main import run

if __name__ == "__main__":
    run()
