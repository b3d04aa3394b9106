"""The error for an input file that cannot be used as it is.

Its message names the file and, where there is one, the sample; `dinorankclip` prints it as one line and exits 2
(the bad-input status, as for bad parameters) instead of ending in a traceback that names neither.
"""


class InputError(ValueError):
    """An input file (a suite, a shard, a feature cache, a checkpoint) that is wrong; the message says where."""
