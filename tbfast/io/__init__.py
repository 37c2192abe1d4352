"""Files tbfast writes for the user: `tbfast.io.output` (safe output files: atomic, never over an input)."""

from .output import STDOUT, OutputRefusedError, check_output, file_ids, output_dir, write_output

__all__ = ["STDOUT", "OutputRefusedError", "check_output", "file_ids", "output_dir", "write_output"]
