"""``python -m stabilizer`` (and ``torchrun -m stabilizer``) runs the command line."""

from stabilizer.cli import main

if __name__ == "__main__":
    main()
