"""Start the playground: `python launch.py [--model DIR] [--device ...] [--port ...]` (see --help).

A Hugging Face Space runs this file (`app_file` in README.md); installed with pip, `yuan-playground` does the same.
"""

from playground.cli import main

if __name__ == "__main__":
    main()
