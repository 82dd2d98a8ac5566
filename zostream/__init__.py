"""zostream: stream a huge LLM through one GPU for generation and zeroth-order fine-tuning.

The code lives in the top-level folders `engine/`, `server/` and `clients/`, which the
build config maps to `zostream.engine`, `zostream.server` and `zostream.clients`.
"""

__version__ = "0.1.0"
