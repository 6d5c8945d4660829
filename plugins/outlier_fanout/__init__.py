"""Built-in reader ``fanout``: each read batch split into chunks read by a pool of threads."""

from outlier_runtime import hookimpl

from .reader import FanoutReader


@hookimpl
def register_readers(register):
    register("fanout", FanoutReader,
             "Parallel chunked preadv by worker threads; uncached reads of aligned requests (packs).")
