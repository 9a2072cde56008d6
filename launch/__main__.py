"""Run the launcher: `python -m launch [torchrun options] -m MODULE [args]`."""

from launch.cli import main

if __name__ == "__main__":
    main()
