"""Execution side of convspec: data, training, evaluation and distributed
helpers.  Filled in by the data and training issues; the compiler lives in
``convspec``."""
