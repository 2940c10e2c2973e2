"""`python -m cil`: the command line (cil.run.cli)."""

from cil.run.cli import cli

if __name__ == "__main__":
    cli()
