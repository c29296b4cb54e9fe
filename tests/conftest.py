"""Test-session settings that must precede every import.

Triton reads TRITON_INTERPRET when it is first imported, and several modules import it
indirectly (torch's compile stack, the kernels package), so the interpreter (Triton kernels on
CPU tensors, CPU-NOTES) is switched on here, before any test module loads. On a GPU machine set
TRITON_INTERPRET=0 to run the kernels on the device instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
